"""Integrations with training libraries: ``fastdpo.integrations.trl`` (TRL's DPOTrainer),
``fastdpo.integrations.llamafactory`` (LLaMA-Factory's DPO trainer), ``fastdpo.integrations.hf`` (plain loops).
None imports its library before it is used."""

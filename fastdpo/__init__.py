"""fastdpo: fused Triton kernels for DPO losses."""

from fastdpo._checkout import unshadow_hf_kernels

unshadow_hf_kernels()  # before anything below imports transformers

from fastdpo.dpo import DPOLoss, DPOLossOutput, FusedDPOLossFunction, dpo_loss
from fastdpo.integrations.hf import policy_dpo_loss, policy_logps
from fastdpo.linear import (LinearDPOLoss, LinearDPOLossFunction, LinearSequenceLogpsFunction, linear_dpo_loss,
                            linear_sequence_logps)
from fastdpo.logps import SequenceLogps, SequenceLogpsFunction, sequence_logps
from fastdpo.losses import LOSS_TYPES, DPOLossConfig, dpo_loss_from_logps
from fastdpo.reference import ReferenceLogps, precompute_reference_logps

__version__ = "0.1.0"

__all__ = ["DPOLoss", "DPOLossConfig", "DPOLossOutput", "FusedDPOLossFunction", "LOSS_TYPES", "LinearDPOLoss",
           "LinearDPOLossFunction", "LinearSequenceLogpsFunction", "ReferenceLogps", "SequenceLogps", "SequenceLogpsFunction",
           "dpo_loss", "dpo_loss_from_logps", "linear_dpo_loss", "linear_sequence_logps", "policy_dpo_loss",
           "policy_logps",
           "precompute_reference_logps", "sequence_logps"]

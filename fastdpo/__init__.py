"""fastdpo: fused Triton kernels for DPO losses."""

from fastdpo._checkout import unshadow_hf_kernels

unshadow_hf_kernels()  # before anything below imports transformers

from fastdpo.dpo import DPOLoss, DPOLossOutput, FusedDPOLossFunction, dpo_loss
from fastdpo.integrations.hf import (PackedBatch, pack_batch, pack_preference_batch, policy_dpo_loss, policy_logps,
                                     unpack_pairs)
from fastdpo.linear import (LinearDPOLoss, LinearDPOLossFunction, LinearSequenceLogpsFunction, linear_dpo_loss,
                            linear_sequence_logps)
from fastdpo.logps import SequenceLogps, SequenceLogpsFunction, sequence_logps
from fastdpo.losses import LOSS_TYPES, DPOLossConfig, dpo_loss_from_logps
from fastdpo.reference import ReferenceLogps, precompute_reference_logps

__version__ = "0.1.0"

__all__ = ["DPOLoss", "DPOLossConfig", "DPOLossOutput", "FusedDPOLossFunction", "LOSS_TYPES", "LinearDPOLoss",
           "LinearDPOLossFunction", "LinearSequenceLogpsFunction", "PackedBatch", "ReferenceLogps", "SequenceLogps", "SequenceLogpsFunction",
           "dpo_loss", "dpo_loss_from_logps", "linear_dpo_loss", "linear_sequence_logps", "pack_batch",
           "pack_preference_batch", "policy_dpo_loss", "policy_logps", "unpack_pairs",
           "precompute_reference_logps", "sequence_logps"]

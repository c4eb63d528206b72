"""Knowledge distillation toward an ensemble's logits (FedDF's server step, Lin et al., 2020)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, mean over the batch.

    The ``T²`` keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    t = float(temperature)
    log_student = F.log_softmax(student.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * t * t

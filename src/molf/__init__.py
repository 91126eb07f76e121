"""molf: Mixture of LoRA and Full fine-tuning.

model = molf.wrap(model, molf.MoLFConfig(lora_ranks=(128,)))
opt = molf.MoLFAdamW(model, lr_fft=5e-5, lr_lora=5e-5)
... loss.backward(); opt.step(); opt.zero_grad() ...
plain = molf.merge_and_unload(model)
molf.save_pretrained(model, "out")   # unmerged; molf.from_pretrained("out") rebuilds it
"""

from molf.config import MoLFConfig
from molf.errors import MolfError
from molf.export import export_peft_lora, merge_and_unload
from molf.layer import MoLFLinear, molf_modules, wrap
from molf.optim import MoLFAdamW
from molf.optim.scores import SCORES, Score, get_score, register_score
from molf.routing import RoutingLog
from molf.saving import from_pretrained, load_wrapped, save_pretrained
from molf.trainable import print_trainable_parameters, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "MoLFConfig",
    "MolfError",
    "MoLFLinear",
    "MoLFAdamW",
    "RoutingLog",
    "SCORES",
    "Score",
    "export_peft_lora",
    "from_pretrained",
    "get_score",
    "load_wrapped",
    "merge_and_unload",
    "molf_modules",
    "print_trainable_parameters",
    "register_score",
    "save_pretrained",
    "trainable_parameters",
    "wrap",
]

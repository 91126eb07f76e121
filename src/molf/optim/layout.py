"""What a MoLFAdamW backend reads: the routed tensors and how they group into modules and experts,
the other parameters, and accessors for their optimizer state. `MoLFAdamW` builds one
`RoutedLayout` when it is constructed; backends read it and never touch the optimizer itself."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def is_plain(t: torch.Tensor) -> bool:
    """A plain tensor, not a subclass such as FSDP2's DTensor."""
    return type(t.data) is torch.Tensor


@dataclass(frozen=True, eq=False)
class RoutedLayout:
    """The routed tensors, module-major and expert-minor, and everything else a step needs.

    `params[t]` belongs to module `module_of[t]` and expert slot `expert_of[t]`; module i owns
    `params[module_start[i]:module_start[i + 1]]`. `decays[t]` says whether tensor t takes its
    expert's weight decay (False for the biases of wrapped layers unless `decay_bias`).
    `tensor_numel[t]` is tensor t's global element count (for DTensors the whole tensor's, not
    the shard's) and `numel[i, e]` the sum over expert e of module i (float64, on the CPU).
    `plain` lists the parameters outside the wrapped modules with the index of their group.
    `state(p)` is p's optimizer state, created (moments zero, step 0) on first use;
    `states()` the optimizer's mapping of parameters to states as it is now (read only: a
    backend checks with it that the tensors it holds pointers to are still the state);
    `wins(i, device)` is module i's win counter, an int64 tensor [experts] on `device`.
    """

    module_names: tuple[str, ...]
    expert_names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]
    module_of: tuple[int, ...]
    expert_of: tuple[int, ...]
    module_start: tuple[int, ...]
    decays: tuple[bool, ...]
    tensor_numel: tuple[int, ...]
    numel: torch.Tensor
    plain: tuple[tuple[torch.Tensor, int], ...]
    state: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    states: Callable[[], Mapping[torch.Tensor, dict[str, torch.Tensor]]]
    wins: Callable[[int, torch.device], torch.Tensor]
    device: torch.device

    @property
    def n_modules(self) -> int:
        return len(self.module_names)

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def sharded(self) -> bool:
        """Whether the routed tensors are shards (FSDP2 DTensors) rather than whole tensors."""
        return not all(is_plain(p) for p in self.params)

    def active_modules(self, has_grad: Sequence[bool] | None = None) -> list[bool]:
        """Per module: whether any of its tensors has a gradient (`has_grad`, per routed tensor,
        defaults to reading `.grad`); inactive modules are not stepped at all."""
        if has_grad is None:
            has_grad = [p.grad is not None for p in self.params]
        start = self.module_start
        return [any(has_grad[start[i] : start[i + 1]]) for i in range(self.n_modules)]

    def tensors_of(self, active: Sequence[bool]) -> list[int]:
        """Indices into `params` of the tensors of the active modules, in order."""
        start = self.module_start
        return [t for i, a in enumerate(active) if a for t in range(start[i], start[i + 1])]

    def numel_with_grad(self, has_grad: Sequence[bool]) -> torch.Tensor:
        """[modules, experts] float64 element counts over the tensors that have a gradient this
        step: a tensor without one is skipped like torch's AdamW skips it, so it does not count
        in its expert's N (docs/method.md section 3). `numel` itself when every tensor has one."""
        if all(has_grad):
            return self.numel
        numel = torch.zeros_like(self.numel)
        for t, has in enumerate(has_grad):
            if has:
                numel[self.module_of[t], self.expert_of[t]] += self.tensor_numel[t]
        return numel

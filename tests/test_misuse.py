"""Misuse is loud once: another optimizer on a wrapped model warns, MoLFAdamW given parameters
and MoLFConfig given wrong types raise molf errors naming what to do, and the API's names."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer

import molf
from tests.test_integrations import arguments, dataset, wrapped


def _wrapped(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return molf.wrap(model, molf.MoLFConfig(lora_ranks=(2,), **config))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int = 3) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return [w for w in caught if issubclass(w.category, molf.MoLFWarning)]


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD])
def test_another_optimizer_on_a_wrapped_model_warns_once(optimizer):
    model = _wrapped()
    found = _steps(model, optimizer(model.parameters(), lr=1e-3))
    assert len(found) == 1
    text = str(found[0].message)
    assert optimizer.__name__ in text and "MoLFAdamW" in text and "use_molf" in text
    assert "8 expert tensors" in text  # two layers, each W, b (the FFT expert), A and B
    # a frozen-base (MoLF-E) model's LoRA experts, likewise
    e = _wrapped(train_base=False)
    assert len(_steps(e, torch.optim.AdamW([p for p in e.parameters() if p.requires_grad]))) == 1


def test_molf_adamw_and_unwrapped_models_do_not_warn():
    model = _wrapped()
    assert _steps(model, molf.MoLFAdamW(model)) == []
    plain = torch.nn.Linear(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = torch.optim.AdamW(plain.parameters())
        plain(torch.randn(2, 8)).sum().backward()
        opt.step()
    assert not [w for w in caught if issubclass(w.category, molf.MoLFWarning)]


def test_a_trainer_without_use_molf_warns(tmp_path):
    args = arguments(tmp_path, max_steps=2, save_strategy="no")
    with pytest.warns(molf.MoLFWarning, match="use_molf"):
        Trainer(model=wrapped(), args=args, train_dataset=dataset(8)).train()


def test_molf_adamw_given_parameters_says_to_pass_the_model():
    model = _wrapped()
    with pytest.raises(molf.MoLFError, match="takes the wrapped model itself"):
        molf.MoLFAdamW(model.parameters())
    with pytest.raises(molf.MoLFError, match="not a list"):
        molf.MoLFAdamW(list(model.parameters()))


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("lora_ranks", 16, "lora_ranks: must be a list or tuple of ints"),
        ("lora_ranks", "128", "lora_ranks: must be a list or tuple of ints"),
        ("lora_ranks", (8.5,), "lora_ranks: must be a list or tuple of ints"),
        ("lora_alphas", 32, "lora_alphas: must be a list or tuple of numbers"),
        ("use_rslora", "yes", "use_rslora: must be True or False"),
        ("train_base", 1, "train_base: must be True or False"),
        ("freeze_non_wrapped", "no", "freeze_non_wrapped: must be True, False or None"),
        ("lora_dropout", "0.1", "lora_dropout: must be a number"),
        ("target_modules", 3, "target_modules: must be a list or tuple of module names"),
        ("exclude_modules", "lm_head", "exclude_modules: must be a list or tuple of module names"),
    ],
)
def test_config_types_are_checked_naming_the_field(field, value, words):
    with pytest.raises(molf.MoLFError, match=words):
        molf.MoLFConfig(**{field: value})


def test_the_api_names_errors_warnings_and_lazy_exports():
    assert molf.MolfError is molf.MoLFError and issubclass(molf.MoLFError, ValueError)
    assert issubclass(molf.MoLFWarning, UserWarning)
    names = dir(molf)
    for public in molf.__all__:
        assert public in names
    assert {"MoLFError", "MoLFWarning", "MolfError"} <= set(molf.__all__)

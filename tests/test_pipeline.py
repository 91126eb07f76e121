"""The whole path (train, save, reload, eval) for every method and task on a tiny model."""

import json

import pytest
import torch

from molf.cli import main
from molf.train.evaluate import evaluate_path
from tests.runs import tiny_run

TINY = dict(
    n_train=8,
    n_val=0,
    n_test=3,
    max_steps=2,
    batch_size=2,
    grad_accum=2,
    lora_rank=4,
    molf_e_ranks="[2,4]",
    lr_fft="1e-3",
    lr_lora="1e-3",
    max_length=96,
)
METHODS = ["fft", "lora", "adalora", "molf", "molf-e"]
TASKS = ["fact-geo", "med-icd10", "spider-dev"]


def _train(tmp_path, method, task, *extra):
    out = tmp_path / f"{task}-{method}"
    code = main(["train", *tiny_run(method, task, **TINY), "--output-dir", str(out), *extra])
    return code, out


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_train_save_reload_eval(tmp_path, method, task):
    code, out = _train(tmp_path, method, task)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 2
    assert summary["headline_metric"] in summary["after"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    model_dir = out / "final" / "model"
    assert (model_dir / "model.safetensors").exists()
    if method in ("lora", "adalora", "molf-e"):
        assert (out / "final" / "adapter" / "adapter_model.safetensors").exists()
    if method in ("molf", "molf-e"):
        assert (out / "routing.jsonl").exists()
        assert set(summary["routing"]["overall"]) == (
            {"fft", "lora_r4"} if method == "molf" else {"lora_r2", "lora_r4"}
        )
    else:
        assert summary["routing"] is None
    # the saved model reproduces the run's own evaluation
    again = evaluate_path(str(model_dir), task)
    assert again["n_records"] == 3
    for k, v in summary["after"].items():
        assert again["metrics"][k] == pytest.approx(v, abs=1e-6), k


@pytest.mark.parametrize("method", ["lora", "molf-e"])
def test_adapter_reloads_to_the_merged_model(tmp_path, method):
    from molf.train.models import load_model

    code, out = _train(tmp_path, method, "fact-geo")
    assert code == 0
    merged, tok = load_model(str(out / "final" / "model"))
    adapted, _ = load_model(str(out / "final" / "adapter"))
    x = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(adapted(**x).logits, merged(**x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "molf-e"])
def test_adapter_base_resolves_with_auto_peft(tmp_path, monkeypatch, method):
    """The adapter names its base by a path peft can open: AutoPeftModelForCausalLM loads it
    (offline, no molf involved, from another working directory) and gives the merged model's
    logits, although the run named its model by a relative path."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from molf.train.models import load_model

    base, tok = load_model("tiny-llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    argv = ["train", *tiny_run(method, "fact-geo", **TINY), "--model", "base"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    adapter = out / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())

    adapted = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "model").eval()
    x = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        expected = merged(**x).logits
        torch.testing.assert_close(adapted(**x).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(**x).logits, expected, atol=1e-4)  # training did something


def test_print_config_and_overrides(capsys):
    assert main(["train", "molf-e", "lr_lora=2e-4", "top_k=2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "method: molf-e" in out and "lr_lora: 0.0002" in out and "top_k: 2" in out


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("molf: error: ")
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--task", "nope"], "unknown task 'nope'"),
        (["train", "--model", "not-a-model"], "not-a-model"),
        (["train", "lr_ftt=1e-3"], "did you mean 'lr_fft'"),
        (["train", "batch_size=zero"], "config key 'batch_size'"),
        (["train", "warmup_ratio=1.5"], "warmup_ratio"),
        (["train", "top_k=3"], "top_k"),
        (["train", "no-such-config.yaml"], "no-such-config.yaml"),
        (["train", "mlof"], "config 'mlof': no such file, and not a bundled config (did you mean"),
        (
            ["train", "--task", "counterfact", "--data", "/nonexistent/cf.json"],
            "/nonexistent/cf.json",
        ),
        (["eval", "--task", "med-icd10", "--model", "nope-model"], "nope-model"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [*argv, *(["--output-dir", str(tmp_path / "run")] if argv[0] == "train" else [])]
    assert main(argv) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["n_test=0"], "config key 'n_test': must be > 0 or null"),
        (["n_val=-1"], "config key 'n_val': must be >= 0 or null"),
        (["threads=0"], "config key 'threads': must be > 0 or null"),
        (["epochs=.inf"], "config key 'epochs': must be a finite number > 0"),
        (["score_eps=0"], "config key 'score_eps': must be > 0"),
        # issue #21 item 3: alpha 0 trained nothing under lora and was refused under molf only
        # after the model loaded, as `MoLFConfig.lora_alphas`
        (["lora_alpha=0"], "config key 'lora_alpha': must be > 0"),
        (["--method", "lora", "lora_alpha=0"], "config key 'lora_alpha': must be > 0"),
        (["--method", "molf-e", "molf_e_alphas=[16,0]"], "config key 'molf_e_alphas': must be > 0"),
        (["lr_fft=0", "lr_lora=0"], "config key 'lr_fft': molf trains with lr_fft and lr_lora"),
        (["--method", "lora", "lr_lora=0"], "config key 'lr_lora': lora trains with lr_lora"),
        (["score=nope"], "config key 'score': unknown score 'nope' (registered: epd, pfn)"),
        (["target_modules=[oops"], "config key 'target_modules': '[oops' is neither"),
        (["target_modules=['']"], "config key 'target_modules': module names must be non-empty"),
        (["--model", " "], "config key 'model': empty"),
        (["generation_metric=bleu"], "config key 'generation_metric': must be one of"),
        (["--task", "fact-geo", "prompt_field=q"], "task 'fact' does not read 'prompt_field'"),
        (["--task", "sft"], "task 'sft' needs a data path"),
        (["--data", "d.jsonl", "--task", "sft", "prompt_field=' '"], "'prompt_field': empty"),
        (
            ["--data", "d.jsonl", "--task", "sft", "eval_every=1", "best_metric=accuracy"],
            "config key 'best_metric': task 'sft' reports loss, perplexity, not 'accuracy'",
        ),
    ],
)
def test_every_config_value_is_checked_before_any_model_loads(
    capsys, monkeypatch, overrides, needle
):
    import molf.train.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(molf.train.models, "load_model", no_model)
    assert main(["train", *overrides]) == 2
    assert needle in _error_line(capsys)


def test_threads_set_torch_s_thread_count(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    code, out = _train(tmp_path, "lora", "fact-geo", "threads=3")
    assert code == 0 and calls == [3]
    model = str(out / "final" / "model")
    assert main(["eval", "--task", "fact-geo", "--model", model, "--threads", "2"]) == 0
    assert calls == [3, 2]
    capsys.readouterr()
    assert main(["eval", "--task", "fact-geo", "--model", model, "--threads", "0"]) == 2
    assert "--threads: must be > 0" in _error_line(capsys)


def test_bad_method_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "qlora"])
    assert e.value.code == 2


def test_bad_records_and_empty_data(tmp_path, capsys):
    cf = tmp_path / "cf.json"

    def train_on_cf(out):
        argv = ["train", "--task", "counterfact", "--data", str(cf), "--model", "tiny-llama"]
        return main([*argv, "--output-dir", str(out)])

    cf.write_text(
        json.dumps([{"case_id": 0, "requested_rewrite": {"prompt": "{} is in", "subject": "X"}}])
    )
    assert train_on_cf(tmp_path / "a") == 2
    assert "record 0: missing field 'requested_rewrite.target_true" in _error_line(capsys)
    cf.write_text("[]")
    assert train_on_cf(tmp_path / "b") == 2
    line = _error_line(capsys)
    assert "no" in line and ("record" in line or "example" in line or "empty" in line)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: molf\nlr_fft: [1e-4\n")
    assert main(["train", str(bad)]) == 2
    assert "malformed YAML" in _error_line(capsys)


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    code, out = _train(tmp_path, "molf", "fact-geo")
    assert code == 0
    capsys.readouterr()
    before = (out / "summary.json").read_text()
    code, _ = _train(tmp_path, "molf", "fact-geo")
    assert code == 2
    assert "--overwrite" in _error_line(capsys)
    assert (out / "summary.json").read_text() == before
    code, _ = _train(tmp_path, "molf", "fact-geo", "--overwrite")
    assert code == 0


def test_the_known_bitsandbytes_notice_is_silenced_and_nothing_else(capsys, caplog):
    """bitsandbytes logs at import, on CPUs with AVX-512 BF16, that it could not fetch a kernel
    from the hub: every molf command would start with that line. Only that line is dropped."""
    import logging
    import subprocess
    import sys

    from tests.runs import child_env

    assert main(["train", "--print-config"]) == 0
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure",
            "Kernel repository 'x' could not verify publisher trust status.",
        )
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: other")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load CPU gemm_4bit_forward from kernels-community: other",
        "something else",
    ]
    # the real thing: bitsandbytes tries the kernel (and logs its notice) on AVX-512 BF16 CPUs;
    # with HF_HUB_OFFLINE set it logs other lines, about offline mode, which are left alone
    env = {k: v for k, v in child_env().items() if k != "HF_HUB_OFFLINE"}
    code = (
        "from molf.cli import main; main(['train', '--print-config']); import peft; "
        "from bitsandbytes.functional import has_avx512bf16; print('tried', bool(has_avx512bf16()))"
    )
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if "tried True" not in quiet.stdout:
        pytest.skip("bitsandbytes does not try the kernel on this CPU")
    assert quiet.returncode == 0 and "gemm_4bit_forward" not in quiet.stderr

"""The device everywhere the base runs: the choice of device and of autocast precision, and every backend
end to end on a base loaded onto a device (the CPU here; every device this machine has where there are more)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import adapterfuse.device
from adapterfuse.backends.ensemble.fit import ensemble
from adapterfuse.backends.merge.api import merge
from adapterfuse.backends.route.api import route
from adapterfuse.base import load_base
from adapterfuse.cli.main import main
from adapterfuse.device import autocast_dtype, autocast_dtype_for, cpu_bf16, resolve_device
from adapterfuse.distributed import map_rows, world
from adapterfuse.errors import ConfigError
from adapterfuse.harness import ZeroShotPredictor, evaluate
from adapterfuse.head import autocast_context
from adapterfuse.recipe.schema import Recipe
from adapterfuse.train.expert import train_expert
from tests.helpers import make_tiny_model, tiny_config, tiny_data

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize(
    ("kind", "bf16", "expected"),
    [
        ("cuda", True, torch.bfloat16),  # a GPU that computes bf16 (Ampere and later)
        ("cuda", False, None),  # an older GPU: fp32
        ("mps", False, None),
        ("mps", True, None),  # MPS runs fp32 whatever it reports
        ("cpu", True, torch.bfloat16),  # AVX512-BF16 or AMX
        ("cpu", False, None),  # a CPU that would emulate bf16: fp32 is faster
    ],
)
def test_autocast_dtype_follows_what_the_device_computes(kind, bf16, expected):
    assert autocast_dtype_for(kind, bf16) == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),  # AVX-512 without its bf16 extension
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),  # e.g. AMD Zen 4
        ("fpu avx512f amx_bf16 amx_tile amx_int8", True),  # Intel with AMX
    ],
)
def test_cpu_bf16_reads_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_bf16(cpuinfo) is expected
    assert cpu_bf16(tmp_path / "missing") is False  # flags unreadable: fp32, never emulated bf16


def test_autocast_context_is_bf16_where_the_cpu_computes_it_and_off_elsewhere(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(adapterfuse.device, "cpu_bf16", lambda native=native: native)
        assert autocast_dtype("cpu") == (torch.bfloat16 if native else None)
        with autocast_context(True, "cpu"):
            assert torch.is_autocast_enabled("cpu") is native
            assert not native or torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert isinstance(autocast_context(True, "mps"), nullcontext)  # fp32 on MPS: no autocast at all
    assert isinstance(autocast_context(False, "cpu"), nullcontext)


def test_auto_picks_cuda_then_mps_then_cpu():
    mps = torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:x", ""])
def test_an_unknown_device_is_a_one_line_error_naming_the_choices(spec):
    with pytest.raises(ConfigError, match=r"device .*expected one of auto, cpu, cuda, mps or 'cuda:N'"):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_the_base_is_loaded():
    # The spec does not exist either: the device is checked first, so nothing is read.
    with pytest.raises(ConfigError, match=r"device 'cuda': no CUDA GPU is visible; use --device cpu or auto"):
        load_base("no/such-base", device="cuda")


def test_cli_device_flag_reaches_the_base(capsys):
    assert main(["eval", "--tasks", "sst2", "--device", "tpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adapterfuse eval: error: device 'tpu': unknown")


def test_recipe_device_field_is_checked_on_load():
    assert Recipe(name="r", tasks={"sst2": {}}).device == "auto"
    assert Recipe(name="r", tasks={"sst2": {}}, device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="device"):
        Recipe(name="r", tasks={"sst2": {}}, device="gpu")


def test_one_process_maps_rows_as_a_plain_call():
    assert world() == (0, 1)
    assert torch.equal(map_rows(lambda xs: torch.tensor(xs) * 2, [3, 1, 2]), torch.tensor([6, 2, 4]))


@pytest.fixture(scope="module")
def base_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("device") / "base"
    make_tiny_model(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _on(model: torch.nn.Module, device: torch.device) -> bool:
    return all(p.device == device for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_every_backend_runs_end_to_end_on_the_bases_device(device, base_folder, tiny_base, tmp_path):
    base = load_base(str(base_folder), device=device)
    assert base.device.type == device and _on(base.model, base.device)
    config = tiny_config(max_train_examples=24)
    data = [tiny_data(tmp_path / "glue", t, config) for t in ("sst2", "stsb")]
    experts = [train_expert(base, d.task, config, out=tmp_path / d.task.name, data=d, progress=False) for d in data]
    zero = evaluate(ZeroShotPredictor(base), data)
    if device == "cpu":  # the same weights read from a folder onto the CPU answer exactly as the in-memory model
        same = evaluate(ZeroShotPredictor(tiny_base), data)
        assert {t: r["score"] for t, r in zero["tasks"].items()} == {t: r["score"] for t, r in same["tasks"].items()}
    merged = merge(experts, method="ties", base=base, validation=data)  # λ chosen on validation
    assert merged.search["lambda_search"]["chosen"] in merged.search["lambda_search"]["grid"]
    merged_predictor = merged.predictor(base)
    assert _on(merged_predictor.model, base.device)
    ens = ensemble(experts, base, weights="learned", validation=data)
    assert _on(ens.batched.model, base.device) and ens.info["weights"] == "learned"
    routed = route(experts, base, router="learned", validation=data)
    for predictor in (merged_predictor, ens, routed):
        result = evaluate(predictor, data)
        assert {t: r["n"] for t, r in result["tasks"].items()} == {d.task.name: len(d.test) for d in data}
        assert torch.isfinite(torch.tensor(result["average"]))


@pytest.mark.slow
def test_device_check_script_runs_every_piece_on_this_machines_device(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("GLUE_DIR", None)  # synthetic prompts
    command = [sys.executable, "benchmarks/device_check.py", "--base", "tiny", "--examples", "8", "--k", "2"]
    done = subprocess.run([*command, "--steps", "1"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for work in ("| scoring |", "| ensemble K=2 |", "| router (arrow top-2) |", "| training (tokens/s) |"):
        assert work in done.stdout

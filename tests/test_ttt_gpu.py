"""PRESET=frontier's evaluation compiled on the GPU (skipped without CUDA).

On one H100 (2026-12-06) the frontier's LoRA TTT pass failed while compiling its graph:
`AttributeError: 'SymFloat' object has no attribute 'size'`; the same pass compiles and runs on the CPU. These
tests train a small artifact on the GPU (uncompiled: training's graphs are not under test), then evaluate it
with the preset's evaluation, compiled, once as the preset has it and once with each of its options off (for
the LoRA targets: PR #1953's no-Q/V set, which the preset left on 2026-12-06), so a failure names the option
that triggers it. Heads are 64 wide with grouped K/V, as in the full model, so the attention kernels are those
of the real run, and windows are longer than training's, so the RoPE base is stretched as at EVAL_SEQ_LEN 2560
(EVAL_SEQ_LEN=128 below turns that off). Run them with
`GPU_CHECK_BUILD=0 GPU_CHECK_TESTS=tests/test_ttt_gpu.py GPU_CHECK_BENCH= bash tools/gpu_mlp_check.sh`."""
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL, subprocess_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU_MODEL = dict(TINY_MODEL, MODEL_DIM="256", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="16",
                 TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="256", TRAIN_BATCH_TOKENS="4096")
EVAL = dict(TTT_CHUNK_TOKENS="1024", TTT_BATCH_SEQS="2", TTT_CHUNK_SIZE="32", TTT_BATCH_DOCS="4", VAL_DOCS="60",
            TTT_PHASE_PREFIX_DOCS="30", SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="1", NGRAM_TILT="1",
            EVAL_FORCE="1")


def run(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=subprocess_env(env), capture_output=True,
                          text=True, timeout=900)


def train_artifact(tiny_data, logs, **extra) -> dict:
    env = dict(GPU_MODEL, PRESET="frontier", DATA_PATH=tiny_data["DATA_PATH"], TOKENIZER_PATH=tiny_data["TOKENIZER_PATH"],
               LOG_DIR=str(logs), RUN_ID="train", ITERATIONS="3", TTT_ENABLED="0", NGRAM_TILT="0",
               SLIDING_WINDOW_ENABLED="0", TRAIN_SEQ_SCHEDULE="64@0,128@0.5", **extra)
    proc = run(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(env, EVAL_ONLY=str(logs / "train.ptz"))


@pytest.fixture(scope="module")
def artifact(tiny_data, tmp_path_factory):
    return train_artifact(tiny_data, tmp_path_factory.mktemp("gpu_ttt"))


@pytest.fixture(scope="module")
def causal_artifact(tiny_data, tmp_path_factory):
    """The preset trained without its document mask: DOC_MASK is a model setting, which EVAL_ONLY cannot turn
    off, so the mask's own option needs an artifact of its own."""
    return train_artifact(tiny_data, tmp_path_factory.mktemp("gpu_ttt_causal"), DOC_MASK="0")


def final_ttt(proc) -> float:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return float(re.search(r"^final_ttt val_loss:\S+ val_bpb:(\S+)", proc.stdout, re.M).group(1))


@pytest.mark.parametrize("option_off", ["", "NGRAM_TILT=0", "TTT_SHORT_DOC_TOKENS=0", "TTT_LORA_ALPHA=0",
                                        "TTT_LORA_RESET=all", "TTT_LORA_TARGETS=k,o,mlp,head", "TTT_PHASES=0",
                                        "EVAL_SEQ_LEN=128", "DOC_MASK=0"])
def test_the_frontier_evaluation_compiles_on_the_gpu(request, option_off):
    """The preset's artifact is document-masked (its phase's SGD then trains through flex attention, its plain
    pass through the masked SDPA reference); DOC_MASK=0 evaluates the causal artifact instead."""
    artifact = request.getfixturevalue("causal_artifact" if option_off == "DOC_MASK=0" else "artifact")
    option_off = "" if option_off == "DOC_MASK=0" else option_off
    env = dict(artifact, **EVAL, RUN_ID="eval_" + (option_off.partition("=")[0].lower() or "preset"))
    if option_off:
        key, _, value = option_off.partition("=")
        env[key] = value
    proc = run(dict(env, COMPILE="1"))
    compiled = final_ttt(proc)
    eager = final_ttt(run(dict(env, COMPILE="0", RUN_ID=env["RUN_ID"] + "_eager")))
    assert compiled == pytest.approx(eager, abs=5e-3)  # bf16 kernels differ between the two; a broken graph does not
    # one LoRA graph for windows on both sides of TRAIN_SEQ_LEN (two cost 283 s of warm-up on an H100)
    assert "ttt:lora graphs_compiled:1" in proc.stdout

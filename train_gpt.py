#!/usr/bin/env python3
"""Parameter Golf trainer: the dual-lane parallel-residual GPT of the PR #1529 record.

One file, configured by environment variables (the SETTINGS table below is the single place
each one is declared). Run on 1-8 GPUs with

    torchrun --standalone --nproc_per_node=8 train_gpt.py

or on a CPU for a smoke run (see README.md). Sections, in order:

    SETTINGS       every environment variable: name, default, help, allowed values
    RUNTIME        errors, logging, distributed set-up
    DATA           challenge shards, the training loader, validation tokens
    MODEL          the GPT: attention, MLP, blocks, lanes, depth recurrence
    OPTIMIZER      Muon (MuonEq-R, batched Newton-Schulz, sharded) + AdamW, schedules, EMA
    QUANTIZATION AND PACKING   GPTQ int6/int8 with SDClip, the artifact format, byte accounting, the shipped stub
    EVALUATION     bits per byte, sliding window, legal score-first TTT (chunk SGD, per-document LoRA), eval budget
    TRAINING       compile warm-up, the wallclock-capped loop, main()
"""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
import glob
import hashlib
import importlib
import json
import linecache
import lzma
import math
import os
import platform
import struct
import sys
import time
import traceback
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape, patched while LoRA TTT compiles)
import torch.nn as nn
import torch.nn.functional as F

# Triton 3.9 warns that its default for contracting a multiply and an add into one FMA will change (off from
# 3.10). Every Triton kernel of a run, ours and torch.compile's, was tested and timed with it on, the default
# of every Triton so far: keep it on unless the environment chooses.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# =================================================================================================
# SETTINGS
# =================================================================================================
# Defaults are the values the PR #1529 record ran with (not its code defaults where they differ:
# MUON_MOMENTUM 0.97, PARALLEL_RESIDUAL_START 8, GPTQ_RESERVE_SECONDS 13).


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (whose Python type is the variable's type), help,
    allowed values, group (README table), range and role. Built from the Settings fields below."""
    name: str
    default: object
    help: str
    choices: tuple = ()
    group: str = "run"
    bounds: str = ""  # allowed range, checked when the value is read: "[2, 8]", "(0, inf)", "[0, 1)"
    role: str = ""    # "model": shapes the model (stored in the artifact and the checkpoint, must match there);
                      # "score": the evaluation score depends on it (stored in the artifact, adopted by EVAL_ONLY)


def setting(default, help: str, choices: tuple = (), group: str = "run", bounds: str = "", role: str = ""):
    """A Settings field: its default and its metadata (see Setting)."""
    return field(default=default, metadata=dict(help=help, choices=choices, group=group, bounds=bounds, role=role))


@dataclass(init=False)
class Settings:
    """Every setting, read once from the environment: variable NAME is attribute `name` (s.matrix_lr is
    MATRIX_LR). The fields are the one declaration: parsing, range checks, the artifact's stored
    settings, the log header and the README table (tools/settings_table.py) all come from them."""
    # --- data and run ---
    data_path: str = setting("./data/datasets/fineweb10B_sp8192",
        "folder holding fineweb_train_*.bin and fineweb_val_*.bin", group="data")
    tokenizer_path: str = setting("./data/tokenizers/fineweb_8192_bpe.model",
        "SentencePiece model the shards were made with", group="data")
    vocab_size: int = setting(8192,
        "vocabulary size; must equal the tokenizer's", group="data", bounds="[2, 65536]", role="model")
    preset: str = setting("pr1529",
        "seed record whose defaults the run starts from (PRESETS; explicit variables still win): pr1529 = the project "
        "defaults; pr1477, pr1536 and pr1204 change the values the README preset table lists; frontier = the later "
        "records' techniques on pr1529 (better than pr1529 on the proxy; not yet run on FineWeb)",
        choices=("pr1529", "pr1477", "pr1536", "pr1204", "frontier"))
    run_id: str = setting("",
        "name of the run: its log is LOG_DIR/<RUN_ID>.txt, its artifact LOG_DIR/<RUN_ID>.ptz (letters, digits, '.', "
        "'_', '-'; default: a fresh random id)")
    log_dir: str = setting("logs", "folder for the run log and, by default, the artifact")
    overwrite: bool = setting(False,
        "allow a RUN_ID whose log or artifact already exists: both are replaced (off: the run refuses)")
    seed: int = setting(1337, "seed of the initialisation and of the training-window order", role="score")
    iterations: int = setting(20000,
        "hard cap on optimizer steps (the wallclock cap normally stops first)", bounds="[1, inf)")
    max_wallclock_seconds: float = setting(600.0,
        "training budget in seconds; 0 disables the cap (schedule then follows ITERATIONS)", bounds="[0, inf)")
    gptq_reserve_seconds: float = setting(0.0,
        "seconds of the budget kept for GPTQ Hessian collection after the loop; 0 = measured: calibration "
        "batches are timed before the timed loop and the reserve is 1.25x their projected time + 1 s",
        bounds="[0, inf)")
    clock_check_every: int = setting(10,
        "training steps between the ranks' clock and loss checks (the only host syncs of the loop; the "
        "wallclock stop stays exact, a NaN loss is caught within this many steps)", bounds="[1, inf)")
    warmup_steps: int = setting(20,
        "untimed compile warm-up steps per graph (looping off, then on; each TRAIN_SEQ_SCHEDULE length in each); "
        "state is rolled back", bounds="[0, inf)")
    train_batch_tokens: int = setting(786432,
        "global tokens per optimizer step, independent of the GPU count", bounds="[1, inf)")
    grad_accum_steps: int = setting(0,
        "micro-batches per optimizer step on each rank; 0 = 8 / WORLD_SIZE (8 GPUs' micro-batch on any GPU count). "
        "The step's windows and its mean gradient do not depend on it; 1 on one GPU with a small "
        "TRAIN_BATCH_TOKENS (ablations) runs one large micro-batch instead of 8 small ones", bounds="[0, inf)")
    train_seq_len: int = setting(2048,
        "training window length in tokens; with TRAIN_SEQ_SCHEDULE, its final (longest) length, which the RoPE "
        "stretch references", bounds="[1, inf)", role="model")
    train_seq_schedule: str = setting("",
        "progressive training context (PR #2014) as length@fraction pairs, e.g. 1024@0,2048@0.3,3072@0.6: each "
        "length trains from its fraction of the budget (the LR schedule's measure) on, TRAIN_BATCH_TOKENS per step "
        "kept (so fewer, longer windows); starts at 0, ends at TRAIN_SEQ_LEN; '' = off")
    train_log_every: int = setting(500, "log a train_loss line every N steps (and steps 1-5)", bounds="[1, inf)")
    val_loss_every: int = setting(4000,
        "validate every N steps during training (0: only at the end)", bounds="[0, inf)")
    val_batch_tokens: int = setting(524288, "global tokens per validation batch", bounds="[1, inf)", role="score")
    eval_seq_len: int = setting(2048, "evaluation window length in tokens", bounds="[1, inf)", role="score")
    compile: bool = setting(True,
        "torch.compile the model and Newton-Schulz (off is slower, for debugging and CPU smoke runs)")
    loss_kernel: str = setting("auto",
        "training loss on CUDA: triton = one fused Triton pass over the bf16 logits forward and one backward "
        "(+1.8% tokens/s on the H200, 2026-12-03); torch = plain softcap + cross-entropy (the reference, and "
        "the path on CPU); auto = triton when Triton imports on CUDA, else torch",
        choices=("auto", "triton", "torch"))
    compile_mode: str = setting("default",
        "how the training step compiles: default; coordinate = coordinate-descent tuning of inductor's fused "
        "kernels; max-autotune = also Triton GEMM templates with fused epilogues (minutes more warm-up)",
        choices=("default", "coordinate", "max-autotune"))
    attn_backend: str = setting("auto",
        "attention kernels: auto = FlashAttention 3 if importable, else PyTorch SDPA (cuDNN on the H200); with "
        "DOC_MASK=1, auto = flex attention on CUDA and masked SDPA on CPU, while varlen (PyTorch's varlen kernel, "
        "torch >= 2.10) and fa3 (FlashAttention 3's) run the training step through a varlen kernel over the "
        "batch's document boundaries and the other passes through flex",
        choices=('auto', 'fa3', 'sdpa', 'flex', 'varlen'))
    doc_mask: bool = setting(False,
        "document-masked attention: a token attends only within its own document (documents start at BOS), in "
        "training and in every evaluation pass", role="model")
    mlp_kernel: str = setting("torch",
        "MLP training kernels on CUDA: torch = plain PyTorch (compiled: as fast as the fused paths end to end on "
        "the H200, 2026-12-02); cutlass = Triton forward + CUTLASS EVT backward; triton = Triton forward; fp8 = "
        "the four MLP GEMMs in FP8 (e4m3 values, e5m2 gradients, per-tensor scales; SM 8.9+; evaluation stays "
        "bf16); auto = cutlass if cutlass_evt_fusion is built, else triton if Triton imports, else torch",
        choices=("auto", "cutlass", "triton", "fp8", "torch"))
    qk_kernel: str = setting("torch",
        "q/k RMS norm + partial RoPE + query gain in training on CUDA: triton = one Triton pass per tensor forward "
        "and one backward (GPU-tested, but slower than torch's compiled chain on an H100: 1.27 against 0.88 ms a "
        "layer and micro-batch); torch = the plain chain that "
        "inductor fuses (the reference, and the path in evaluation, TTT and on CPU); auto = the faster as measured, "
        "torch for now", choices=("auto", "triton", "torch"))
    # --- model ---
    num_layers: int = setting(11, "physical transformer blocks", group="model", bounds="[1, inf)", role="model")
    model_dim: int = setting(512, "residual stream width", group="model", bounds="[1, inf)", role="model")
    num_heads: int = setting(8, "query heads", group="model", bounds="[1, inf)", role="model")
    num_kv_heads: int = setting(4,
        "key/value heads (grouped-query attention)", group="model", bounds="[1, inf)", role="model")
    mlp_mult: float = setting(4.0,
        "MLP hidden width as a multiple of MODEL_DIM", group="model", bounds="(0, inf)", role="model")
    rope_dims: int = setting(16,
        "leading dims of each head that RoPE rotates (partial RoPE)", group="model", bounds="[0, inf)", role="model")
    rope_base: float = setting(10000.0, "RoPE base frequency", group="model", bounds="(0, inf)", role="model")
    qk_gain_init: float = setting(5.0,
        "initial per-head gain applied to the RMS-normed queries", group="model", role="model")
    attn_gate_dims: int = setting(0,
        "sparse attention output gate (PR #1787): each head's output times sigmoid of a learned weighting of the "
        "first N dims of the block's normed input (12 in the record; 0: off)",
        group="model", bounds="[0, inf)", role="model")
    xsa_last_n: int = setting(11,
        "exclusive self-attention on the last N physical layers", group="model", bounds="[0, inf)", role="model")
    logit_softcap: float = setting(30.0,
        "logits are squashed to c*tanh(z/c)", group="model", bounds="(0, inf)", role="model")
    tied_embed_init_std: float = setting(0.005,
        "std of the tied embedding's normal initialisation", group="model", bounds="[0, inf)", role="model")
    skip_gates_enabled: bool = setting(True,
        "U-Net skips are sigmoid-gated lerps (off: plain weighted adds)", group="model", role="model")
    ln_scale: bool = setting(True, "scale each block's normed input by 1/sqrt(layer+1)", group="model", role="model")
    num_loops: int = setting(2,
        "extra passes over layers LOOP_START..LOOP_END once looping is on (0: no recurrence)",
        group="model", bounds="[0, inf)", role="model")
    loop_start: int = setting(3,
        "first physical layer of the recurrent segment", group="model", bounds="[0, inf)", role="model")
    loop_end: int = setting(5,
        "last physical layer of the recurrent segment (inclusive)", group="model", bounds="[0, inf)", role="model")
    enable_looping_at: float = setting(0.35,
        "fraction of the training budget at which depth recurrence switches on", group="model", bounds="[0, 1]")
    enable_looping_at_step: int = setting(0,
        "optimizer step at which depth recurrence switches on (PR #1204: 3000); 0: ENABLE_LOOPING_AT decides",
        group="model", bounds="[0, inf)")
    untie_loop_mlp: bool = setting(False,
        "each extra pass over the recurrent segment has its own MLP weights, copied from the first pass's when "
        "looping switches on (PR #1204); attention stays shared", group="model", role="model")
    attn_off_layers: str = setting("",
        "comma-separated physical layers without attention (PR #1204: 0): the block is its MLP alone",
        group="model", role="model")
    value_embed_layers: str = setting("",
        "comma-separated physical layers whose attention values add a value embedding (PR #1204: 9,10): one shared "
        "table VOCAB_SIZE x VALUE_EMBED_DIM projected to the key/value width, with a learned scale per layer",
        group="model", role="model")
    value_embed_dim: int = setting(128,
        "width of the value-embedding table", group="model", bounds="[1, inf)", role="model")
    bigram_hash_buckets: int = setting(0,
        "BigramHash embedding trained with the model (PR #1204: 2816): buckets of the hashed (previous, current) token "
        "pair, added to the token embedding before its norm; 0: off", group="model", bounds="[0, inf)", role="model")
    bigram_hash_dim: int = setting(112,
        "width of the BigramHash table, projected to MODEL_DIM", group="model", bounds="[1, inf)", role="model")
    smear_gate: bool = setting(False,
        "SmearGate (PR #1204): each position mixes in the previous position's embedding through a learned per-channel "
        "gate; masked at BOS, so nothing crosses into a document", group="model", role="model")
    parallel_residual_mode: str = setting("full",
        "two-lane residuals: full = PR #1529, split = PR #1477, sequential = PR #1204, off",
        choices=('full', 'split', 'sequential', 'off'), group="model", role="model")
    parallel_residual_start: int = setting(8,
        "first physical layer that runs as a two-lane block", group="model", bounds="[0, inf)", role="model")
    # --- optimizer ---
    matrix_lr: float = setting(0.022, "Muon learning rate of the block matrices", group="optimizer", bounds="[0, inf)")
    tied_embed_lr: float = setting(0.03,
        "AdamW learning rate of the tied embedding", group="optimizer", bounds="[0, inf)")
    scalar_lr: float = setting(0.02,
        "AdamW learning rate of gains, mixes, skips and lane lambdas", group="optimizer", bounds="[0, inf)")
    muon_momentum: float = setting(0.97, "Muon Nesterov momentum after warm-up", group="optimizer", bounds="[0, 1)")
    muon_momentum_warmup_start: float = setting(0.92, "Muon momentum at step 0", group="optimizer", bounds="[0, 1)")
    muon_momentum_warmup_steps: int = setting(1500,
        "steps over which the momentum rises linearly", group="optimizer", bounds="[0, inf)")
    muon_backend_steps: int = setting(5, "Newton-Schulz iterations", group="optimizer", bounds="[1, inf)")
    muon_ns_coeffs: str = setting("quintic",
        "Newton-Schulz coefficients: quintic (3.4445, -4.775, 2.0315) or polar_express",
        choices=('quintic', 'polar_express'), group="optimizer")
    muon_row_normalize: bool = setting(True,
        "MuonEq-R: normalise each row of the update before Newton-Schulz", group="optimizer")
    muon_wd: float = setting(0.095, "decoupled weight decay of the Muon matrices", group="optimizer", bounds="[0, inf)")
    muon_comm_dtype: str = setting("bf16",
        "several GPUs: dtype of Muon's gradient reduce-scatter (bf16 sends half the bytes; the updates travel in bf16 "
        "either way)", choices=("bf16", "fp32"), group="optimizer")
    embed_wd: float = setting(0.095, "AdamW weight decay of the tied embedding", group="optimizer", bounds="[0, inf)")
    adam_wd: float = setting(0.02,
        "AdamW weight decay of the scalar/control tensors", group="optimizer", bounds="[0, inf)")
    beta1: float = setting(0.9, "AdamW beta1", group="optimizer", bounds="[0, 1)")
    beta2: float = setting(0.95, "AdamW beta2", group="optimizer", bounds="[0, 1)")
    adam_eps: float = setting(1e-08, "AdamW epsilon", group="optimizer", bounds="(0, inf)")
    grad_clip_norm: float = setting(0.3,
        "clip the global gradient norm to this (0: off)", group="optimizer", bounds="[0, inf)")
    warmdown_frac: float = setting(0.667,
        "last fraction of the budget over which the LR falls linearly", group="optimizer", bounds="[0, 1]")
    min_lr: float = setting(0.0, "floor of the LR multiplier during warm-down", group="optimizer", bounds="[0, 1]")
    ema_decay: float = setting(0.997,
        "decay of the weight EMA swapped in after training (0: no EMA)", group="optimizer", bounds="[0, 1)")
    ema_warmup: bool = setting(False,
        "the EMA's n-th update uses decay min(EMA_DECAY, (1 + n) / (10 + n)), so the initial weights and the first "
        "steps fade out within a short run (at 0.99 a plain 300-step average still holds 5% of the initial "
        "weights); the same as plain EMA once n > (10d - 1) / (1 - d), 2,570 updates at 0.9965. Unmeasured: "
        "off by default", group="optimizer")
    # --- quantization and the artifact ---
    gptq_calibration: str = setting("train",
        "GPTQ calibration data: train = this rank's training micro-batches from a fresh loader (counted in the "
        "budget); selfgen = sequences the model samples itself (much slower)",
        choices=('train', 'selfgen'), group="quantization")
    gptq_calibration_batches: int = setting(64,
        "calibration micro-batches per rank, each TRAIN_BATCH_TOKENS / (WORLD_SIZE x GRAD_ACCUM_STEPS) tokens (at "
        "the default accumulation the same count and Hessian time on 1 or 8 GPUs; the Hessians are all-reduced, "
        "so 8 GPUs see 8x the tokens); selfgen: sequences per rank",
        group="quantization", bounds="[1, inf)")
    gptq_damp: float = setting(0.01,
        "GPTQ damping added to the Hessian diagonal, as a fraction of its mean",
        group="quantization", bounds="[0, inf)")
    gptq_block_size: int = setting(128,
        "columns per GPTQ block (errors propagate inside a block column by column, then to later blocks at once; "
        "scalar GPTQ's result is the same for any size up to rounding). With GPTQ_TCQ each row settles its trellis "
        "path at a block's end: 256 lowered the error by 0.5-0.9% on a synthetic layer, for 30-40% more solve time",
        group="quantization", bounds="[1, inf)")
    matrix_bits: int = setting(6,
        "bits of the block matrices (values in [-(2^(b-1)-1), 2^(b-1)-1])", group="quantization", bounds="[2, 8]")
    matrix_clip_sigmas: float = setting(12.85,
        "SDClip: a block-matrix row's scale is k*std(row)/q_max; larger k = finer steps, bigger artifact",
        group="quantization", bounds="(0, inf)")
    attn_bits: int = setting(0,
        "bits of the attention matrices (c_q, c_k, c_v, proj); 0 = MATRIX_BITS", group="quantization", bounds="[0, 8]")
    mlp_bits: int = setting(0, "bits of the MLP matrices (fc, proj); 0 = MATRIX_BITS", group="quantization",
                            bounds="[0, 8]")
    attn_clip_sigmas: float = setting(0.0,
        "SDClip k of the attention matrices; 0 = MATRIX_CLIP_SIGMAS", group="quantization", bounds="[0, inf)")
    mlp_clip_sigmas: float = setting(0.0,
        "SDClip k of the MLP matrices; 0 = MATRIX_CLIP_SIGMAS", group="quantization", bounds="[0, inf)")
    gptq_mixed_bits: str = setting("",
        "mixed-bit GPTQ (PR #1204) as 'low,high', e.g. 5,6: every block matrix gets low or high bits, the "
        "GPTQ_MIXED_HIGH_FRAC with the largest Hessian trace the high ones; '' = off (role bits apply)",
        group="quantization")
    gptq_mixed_high_frac: float = setting(0.5,
        "fraction of the block matrices (largest Hessian trace first) that GPTQ_MIXED_BITS gives its high bits",
        group="quantization", bounds="[0, 1]")
    embed_bits: int = setting(8, "bits of the tied embedding", group="quantization", bounds="[2, 8]")
    embed_clip_sigmas: float = setting(20.0, "SDClip k of the tied embedding", group="quantization", bounds="(0, inf)")
    awq_group: int = setting(0,
        "AWQ-lite (PR #1908): per quantized matrix, the aligned group of this many input columns with the largest "
        "activation RMS x mean |weight| is rounded with AWQ_BITS inside the same GPTQ solve; 0 = off",
        group="quantization", bounds="[0, inf)")
    awq_bits: int = setting(8, "bits of the AWQ-lite salient column group", group="quantization", bounds="[3, 8]")
    lqer_top_k: int = setting(0,
        "LQER (PR #1797): the K quantized matrices with the largest GPTQ error norm get a low-rank correction A.B "
        "of that error (A int2 with one scale, B int4 with group-64 scales); 0 = off",
        group="quantization", bounds="[0, inf)")
    lqer_rank: int = setting(4, "rank of the LQER correction", group="quantization", bounds="[1, 64]")
    gptq_tcq: bool = setting(False,
        "trellis-coded GPTQ: each row's values follow a trellis (GPTQ_TCQ_STATES) over a grid GPTQ_TCQ_STEP times the "
        "scalar one, chosen by a Viterbi search inside the GPTQ solve; about 0.15 bit less per weight at the "
        "same GPTQ error on a synthetic layer (not yet measured on trained weights); not with AWQ_GROUP",
        group="quantization")
    gptq_tcq_step: float = setting(0.57,
        "GPTQ_TCQ's fine grid step as a fraction of the scalar step (BITS and CLIP_SIGMAS still set the scalar step "
        "and the clip range): smaller = finer, bigger artifact; 0.57 gives about the scalar grid's GPTQ error",
        group="quantization", bounds="(0, 1]")
    gptq_tcq_states: int = setting(8,
        "states of GPTQ_TCQ's trellis: 4, 8, 16, 32, 64, 128 or 256 (Ungerboeck's one-dimensional codes). More states "
        "reach a lower error on the same grid, so GPTQ_TCQ_STEP can grow at equal error: on a synthetic layer 64 "
        "states at step 0.587 match 8 states at 0.57 with 1.2% fewer bytes (256 at 0.596: 1.75%); the GPTQ solve's "
        "time grows about with the count (10x at 64 on CPU), decoding's does not. 8 is the trellis measured on "
        "trained weights",
        group="quantization", bounds="[4, 256]")
    compressor: str = setting("brotli",
        "compressor of the artifact: brotli-11, lzma -9e, zpaq (level 5 in blocks of 1 MiB, which decode in "
        "parallel; optional pip package zpaq>=0.3.7) or ans (order-0 ANS per grid stream, brotli for the header; "
        "optional pip package constriction); an optional package is needed at training and at evaluation, and is "
        "checked by a round trip at start-up", choices=('brotli', 'lzma', 'zpaq', 'ans'), group="quantization")
    row_order: str = setting("none",
        "rows of each quantized matrix before compression: none, or similarity (a greedy nearest-neighbour chain "
        "by L1 distance, PR #1855; the permutation ships as uint16 and is undone on load)",
        choices=('none', 'similarity'), group="quantization")
    passthrough_max_numel: int = setting(65536,
        "float tensors with at most this many elements ship as fp16 instead of being quantized",
        group="quantization", bounds="[0, inf)")
    artifact_path: str = setting("",
        "where the compressed model goes (default LOG_DIR/<RUN_ID>.ptz)", group="quantization")
    artifact_limit_bytes: int = setting(16000000,
        "limit on model bytes + code bytes; the run fails before evaluation above it, and before training "
        "when the shape-based estimate (artifact_estimate) is more than 2.5% above it (over it but within "
        "that margin, the log warns)",
        group="quantization", bounds="[1, inf)")
    code_bytes_from: str = setting("packed",
        "code bytes counted: packed = the shipped form tools/pack_submission.py writes, computed from the running "
        "source; file = the size of the file being run", choices=('packed', 'file'), group="quantization")
    eval_only: str = setting("",
        "path of an artifact: skip training, rebuild the model from the artifact alone and evaluate it (reads "
        "tokenizer and validation shards only)", group="quantization")
    # --- evaluation (the challenge scores val_bpb; every pass below is legal under issue #1017's four conditions) ---
    val_tokens_expected: int = setting(0,
        "stop unless validation has exactly this many scored targets (0: no check); the official SP8192 split at "
        "EVAL_SEQ_LEN 2048 gives 40540160", group="evaluation", bounds="[0, inf)")
    val_docs: int = setting(0,
        "score only the first N validation documents, cut to whole EVAL_SEQ_LEN windows as the full split is "
        "(0: all): the same fixed prefix for quick comparisons, never a challenge score (the log warns)",
        group="evaluation", bounds="[0, inf)")
    byte_check_docs: int = setting(1000,
        "validation documents decoded at start-up to cross-check the byte tables (0: skip)",
        group="evaluation", bounds="[0, inf)")
    sliding_window_enabled: bool = setting(True,
        "score with windows of EVAL_SEQ_LEN that advance by EVAL_STRIDE", group="evaluation", role="score")
    eval_stride: int = setting(64,
        "sliding-window step: each target after the first window sees >= EVAL_SEQ_LEN - EVAL_STRIDE tokens",
        group="evaluation", bounds="[1, inf)", role="score")
    eval_batch_windows: int = setting(32,
        "sliding windows per forward pass on each rank", group="evaluation", bounds="[1, inf)", role="score")
    eval_budget_seconds: float = setting(600.0,
        "evaluation budget the passes after training must fit, estimated for 8 GPUs",
        group="evaluation", bounds="(0, inf)")
    eval_force: bool = setting(False,
        "run even when the early estimate says the passes exceed EVAL_BUDGET_SECONDS", group="evaluation")
    eval_budget_counts: str = setting("records",
        "what EVAL_BUDGET_SECONDS holds: records = the passes' work without each one's fixed part (compile warm-up "
        "and first batch), as the records leave TTT's compile warm-up out (they drop diagnostic passes too; this "
        "keeps them); all = everything after training, compile included. The log gives both totals",
        choices=("records", "all"), group="evaluation")
    ttt_enabled: bool = setting(True,
        "score-first test-time training after the sliding-window pass", group="evaluation", role="score")
    ttt_mode: str = setting("chunk",
        "chunk: SGD on the whole model, chunk by chunk (PR #1529); lora: per-document LoRA (PR #1530)",
        choices=('chunk', 'lora'), group="evaluation", role="score")
    ttt_chunk_tokens: int = setting(32768,
        "chunk mode: targets scored before each round of training; with TTT_PHASES also the chunks of each phase's SGD",
        group="evaluation", bounds="[1, inf)", role="score")
    ttt_epochs: int = setting(3,
        "chunk mode: passes over each scored chunk", group="evaluation", bounds="[0, inf)", role="score")
    ttt_lr: float = setting(0.01,
        "chunk mode: SGD learning rate, cosine-decayed to 0 over the chunks",
        group="evaluation", bounds="[0, inf)", role="score")
    ttt_momentum: float = setting(0.9,
        "chunk mode: SGD momentum, kept across chunks; TTT_PHASES: the same, reset each phase",
        group="evaluation", bounds="[0, 1)", role="score")
    ttt_grad_clip: float = setting(1.0,
        "chunk mode and TTT_PHASES: clip the global gradient norm to this (0: off)",
        group="evaluation", bounds="[0, inf)", role="score")
    ttt_freeze_blocks: int = setting(0,
        "chunk mode: leave the first N physical blocks untrained", group="evaluation", bounds="[0, inf)", role="score")
    ttt_batch_seqs: int = setting(32,
        "chunk mode and TTT_PHASES: EVAL_SEQ_LEN sequences per SGD step, summed over ranks",
        group="evaluation", bounds="[1, inf)", role="score")
    hash_embed_enabled: bool = setting(True,
        "chunk mode: add a zero-initialised bigram-hash embedding that only TTT trains",
        group="evaluation", role="score")
    hash_embed_size: int = setting(16384,
        "chunk mode: hash-embedding buckets, indexed (prev*2039 + cur) mod size",
        group="evaluation", bounds="[1, inf)", role="score")
    ttt_lora_rank: int = setting(96,
        "lora mode: adapter rank of each target (TTT_LORA_TARGETS)", group="evaluation", bounds="[1, inf)",
        role="score")
    ttt_lora_targets: str = setting("q,k,v,o,mlp,head",
        "lora mode: comma list of the outputs that get adapters, among q, k, v, o, mlp, head (PR #1953: k,o,mlp,head)",
        group="evaluation", role="score")
    ttt_lora_alpha: float = setting(0.0,
        "lora mode: scale every adapter's output by TTT_LORA_ALPHA / TTT_LORA_RANK (PR #1767: 144); 0: unscaled",
        group="evaluation", bounds="[0, inf)", role="score")
    ttt_lora_reset: str = setting("all",
        "lora mode: what a new document resets. all: fresh A and B; b_only: B zeroed, A kept from the finished "
        "document that last held its adapter slot (PR #1767's warm-start A); AdamW state fresh either way",
        choices=('all', 'b_only'), group="evaluation", role="score")
    ttt_lora_lr: float = setting(0.0001,
        "lora mode: AdamW learning rate", group="evaluation", bounds="[0, inf)", role="score")
    ttt_lora_wd: float = setting(0.5,
        "lora mode: AdamW decoupled weight decay", group="evaluation", bounds="[0, inf)", role="score")
    ttt_lora_beta1: float = setting(0.0, "lora mode: AdamW beta1", group="evaluation", bounds="[0, 1)", role="score")
    ttt_lora_beta2: float = setting(0.999, "lora mode: AdamW beta2", group="evaluation", bounds="[0, 1)", role="score")
    ttt_chunk_size: int = setting(64,
        "lora mode: targets of a document scored before each adapter step",
        group="evaluation", bounds="[1, inf)", role="score")
    ttt_short_doc_tokens: int = setting(0,
        "lora mode: score the first N targets of every document (rounded up to whole chunks), so all of a shorter "
        "one, TTT_SHORT_DOC_CHUNK_SIZE at a time (PR #2014's short-document chunks, by position: causal); 0: off",
        group="evaluation", bounds="[0, inf)", role="score")
    ttt_short_doc_chunk_size: int = setting(32,
        "lora mode: the smaller score-before-update chunk of TTT_SHORT_DOC_TOKENS, at most TTT_CHUNK_SIZE",
        group="evaluation", bounds="[1, inf)", role="score")
    ttt_batch_docs: int = setting(32,
        "lora mode: documents per step at a full EVAL_SEQ_LEN window; shorter windows take more, up to 4x",
        group="evaluation", bounds="[1, inf)", role="score")
    ttt_docs_in_flight: int = setting(256,
        "lora mode: documents holding adapters at once on each rank (memory: 8 bytes x adapter size, 67 MB, each)",
        group="evaluation", bounds="[1, inf)", role="score")
    ttt_phases: int = setting(0,
        "lora mode: phased TTT (PR #1610, #1626): cut the first TTT_PHASE_PREFIX_DOCS documents into N equal parts; "
        "once a part is fully scored, the base model takes an SGD pass over every document scored so far, and "
        "the rest is scored (adapters reset per TTT_LORA_RESET) on the updated base (0: off)",
        group="evaluation", bounds="[0, inf)", role="score")
    ttt_phase_prefix_docs: int = setting(2500,
        "TTT_PHASES: documents, in original order, that the phases cover (PR #1855: 2500)",
        group="evaluation", bounds="[1, inf)", role="score")
    ttt_phase_lr: float = setting(0.001,
        "TTT_PHASES: SGD learning rate of each phase, cosine-decayed to 0 over its TTT_CHUNK_TOKENS chunks",
        group="evaluation", bounds="[0, inf)", role="score")
    ttt_phase_epochs: int = setting(1,
        "TTT_PHASES: passes over each chunk of the scored prefix in each phase",
        group="evaluation", bounds="[1, inf)", role="score")
    ngram_tilt: bool = setting(False,
        "token n-gram tilt of the sliding-window and TTT passes (PR #1514/#2135): where the last NGRAM_TILT_ORDER "
        "tokens occurred earlier in the validation stream, the token that followed them then gets "
        "+NGRAM_TILT_BETA on its logit and the distribution is renormalised over the full vocabulary; only "
        "earlier targets feed the statistics", group="evaluation", role="score")
    ngram_tilt_order: int = setting(16,
        "n-gram tilt: context tokens that must match (the records' order 16)",
        group="evaluation", bounds="[1, 1024]", role="score")
    ngram_tilt_beta: float = setting(2.0,
        "n-gram tilt: logit added to the hinted token (PR #1514: 2.0)", group="evaluation", bounds="(0, inf)",
        role="score")
    ngram_tilt_min_count: int = setting(1,
        "n-gram tilt: earlier times the hinted token must have followed the context",
        group="evaluation", bounds="[1, inf)", role="score")
    ngram_tilt_threshold: float = setting(0.8,
        "n-gram tilt: least share of the context's earlier occurrences that the hinted token must have followed",
        group="evaluation", bounds="[0, 1]", role="score")
    save_checkpoint: str = setting("",
        "after training, save the raw post-EMA state dict here (for tools/bench_eval.py)", group="evaluation")
    load_checkpoint: str = setting("",
        "skip training and evaluate this state dict (saved by SAVE_CHECKPOINT)", group="evaluation")

    def __init__(self, environ=None, **overrides):
        environ = os.environ if environ is None else environ
        typos = misspelled_settings(environ)
        if typos:
            var, name = typos[0]
            raise UserError(f"{var} is not a setting: did you mean {name}? (rename it; the settings are listed in "
                            "README.md)")
        # Layers: project default < the preset's value < an environment variable < a keyword override.
        raw_preset = overrides.get("preset") or environ.get("PRESET") or SETTINGS_BY_NAME["PRESET"].default
        preset = PRESETS.get(_parse_setting(SETTINGS_BY_NAME["PRESET"], raw_preset), {})
        for s in SETTINGS:
            raw = environ.get(s.name)
            setattr(self, s.name.lower(), preset.get(s.name, s.default) if raw is None or raw == "" else
                    _parse_setting(s, raw))
        for key, value in overrides.items():
            if key.upper() not in SETTINGS_BY_NAME:
                raise UserError(f"unknown setting {key}")
            setattr(self, key, value)
        if not self.run_id:
            self.run_id = uuid.uuid4().hex[:12]
        if not all(c.isalnum() or c in "._-" for c in self.run_id) or self.run_id.startswith("."):
            raise UserError(f"RUN_ID={self.run_id!r} must be a plain name (letters, digits, '.', '_', '-'): "
                            f"for a folder of runs use LOG_DIR, e.g. LOG_DIR=logs/exp1 RUN_ID=seed1337")

    def items(self):
        return [(s.name, getattr(self, s.name.lower())) for s in SETTINGS]

    def validate(self, world_size: int) -> int:
        """Cross-field checks that a single variable's range cannot express; returns the grad accumulation."""
        need(world_size >= 1 and 8 % world_size == 0, f"WORLD_SIZE={world_size} must divide 8 (1, 2, 4 or 8 processes)")
        need(self.train_batch_tokens % (8 * self.train_seq_len) == 0,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of "
             f"8*TRAIN_SEQ_LEN={8 * self.train_seq_len} "
             f"(8 = the largest world size: the step's windows do not depend on the GPU count)")
        grad_accum = self.grad_accum_steps or 8 // world_size
        for _, length in seq_schedule(self):
            windows = self.train_batch_tokens // length
            need(windows % (world_size * grad_accum) == 0,
                 f"GRAD_ACCUM_STEPS={grad_accum}: a step's {windows} windows of {length} tokens do not split into "
                 f"WORLD_SIZE={world_size} x {grad_accum} equal micro-batches: choose GRAD_ACCUM_STEPS so that "
                 f"{world_size} x it divides {windows}, or 0 (= {8 // world_size})")
        need(self.model_dim % self.num_heads == 0,
             f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        need(self.rope_dims <= head_dim and self.rope_dims % 2 == 0,
             f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim {head_dim}")
        need(self.attn_gate_dims <= self.model_dim,
             f"ATTN_GATE_DIMS={self.attn_gate_dims} must be at most MODEL_DIM={self.model_dim}")
        need(self.xsa_last_n <= self.num_layers,
             f"XSA_LAST_N={self.xsa_last_n} must be between 0 and NUM_LAYERS={self.num_layers}")
        need(mlp_hidden(self) >= 1,
             f"MLP_MULT={self.mlp_mult} x MODEL_DIM={self.model_dim} rounds the MLP width to 0: raise MLP_MULT")
        if self.num_loops > 0:
            need(0 <= self.loop_start <= self.loop_end < self.num_layers,
                 f"LOOP_START={self.loop_start} and LOOP_END={self.loop_end} must satisfy "
                 f"0 <= LOOP_START <= LOOP_END < NUM_LAYERS={self.num_layers}")
        layer_list(self.attn_off_layers, "ATTN_OFF_LAYERS", self.num_layers)
        layer_list(self.value_embed_layers, "VALUE_EMBED_LAYERS", self.num_layers)
        need(not self.untie_loop_mlp or self.num_loops > 0,
             "UNTIE_LOOP_MLP=1 needs depth recurrence: set NUM_LOOPS >= 1 or UNTIE_LOOP_MLP=0")
        need(self.max_wallclock_seconds == 0 or self.max_wallclock_seconds > self.gptq_reserve_seconds,
             f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds} leaves no training time after "
             f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds}")
        need(self.doc_mask or self.attn_backend not in ("flex", "varlen"),
             f"ATTN_BACKEND={self.attn_backend} needs DOC_MASK=1 (causal attention is fastest through SDPA): "
             "set one or the other")
        validate_eval_settings(self)
        validate_quantization_settings(self)
        return grad_accum


def mixed_bits(s) -> tuple | None:
    """(low, high) of GPTQ_MIXED_BITS, or None when it is off."""
    if not s.gptq_mixed_bits:
        return None
    parts = s.gptq_mixed_bits.replace(" ", "").split(",")
    need(len(parts) == 2 and all(p.isdigit() for p in parts) and 2 <= int(parts[0]) < int(parts[1]) <= 8,
         f"GPTQ_MIXED_BITS={s.gptq_mixed_bits!r} must be two bit widths 'low,high' with 2 <= low < high <= 8, "
         f"e.g. 5,6 (or empty for off)")
    return int(parts[0]), int(parts[1])


def validate_quantization_settings(s):
    for name in ("ATTN_BITS", "MLP_BITS"):
        need(getattr(s, name.lower()) != 1, f"{name}=1 is not a bit width: use 2..8, or 0 for MATRIX_BITS")
    if mixed_bits(s) is not None:
        need(s.attn_bits == 0 and s.mlp_bits == 0,
             f"GPTQ_MIXED_BITS={s.gptq_mixed_bits} chooses every block matrix's bits: unset ATTN_BITS/MLP_BITS")
    need(s.gptq_tcq_states in TCQ_PARITY_CHECKS,
         f"GPTQ_TCQ_STATES={s.gptq_tcq_states} has no trellis here: use one of "
         f"{', '.join(map(str, sorted(TCQ_PARITY_CHECKS)))}")
    need(not (s.gptq_tcq and s.awq_group > 0),
         f"GPTQ_TCQ=1 and AWQ_GROUP={s.awq_group}: the trellis search has no finer column group; set AWQ_GROUP=0 "
         f"or GPTQ_TCQ=0")
    check_compressor(s.compressor)


SETTINGS = [Setting(f.name.upper(), f.default, **f.metadata) for f in fields(Settings)]
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}

# --- presets: each seed record's system as data -----------------------------------------------------
# PRESET=name starts every setting below from that record's value instead of the project default;
# an explicit environment variable still wins. Values are the record's run values (reference-spec §3,
# §6, §8, §10); pr1529 is the project default itself. tests/test_presets.py checks that every key is a
# setting and every value passes that setting's type, choices and range.
PRESETS = {
    "pr1529": {},
    # PR #1477 (1.0822): the PR #1394/#1413 line it builds on (spec §10: MATRIX_LR 0.02, MUON_WD and
    # EMBED_WD 0.085, Muon 0.99 before PR #1514), layers 4-5 looped twice from half of training,
    # split lanes from layer 7 with the learned lane_merge, chunk TTT at lr 0.005 without hash embedding.
    "pr1477": dict(NUM_LOOPS=2, LOOP_START=4, LOOP_END=5, ENABLE_LOOPING_AT=0.5,
                   PARALLEL_RESIDUAL_MODE="split", PARALLEL_RESIDUAL_START=7, QK_GAIN_INIT=5.0,
                   MATRIX_LR=0.02, MUON_WD=0.085, EMBED_WD=0.085, MUON_MOMENTUM=0.99,
                   TTT_LR=0.005, HASH_EMBED_ENABLED=False),
    # PR #1536 (1.07747, non-record) on PR #1530's training defaults (spec §8: warm-down 0.72, EMA 0.9965,
    # EMBED_WD 0.085, two lanes from layer 8, no sliding-window pass), PR #1523's split lanes, layers 3-5
    # looped, Muon 0.97, document-masked attention (PR #1530's VarLen), per-document LoRA TTT with 64-token
    # chunks, scored here in original document order.
    "pr1536": dict(DOC_MASK=True, PARALLEL_RESIDUAL_MODE="split", PARALLEL_RESIDUAL_START=8, MUON_MOMENTUM=0.97,
                   WARMDOWN_FRAC=0.72, EMA_DECAY=0.9965, EMBED_WD=0.085, SLIDING_WINDOW_ENABLED=False,
                   TTT_MODE="lora", TTT_CHUNK_SIZE=64),
    # PR #1204 (1.1063, SP1024, no TTT): 11L x 512 with a 3x MLP, layers 4-5 repeated once from step 3000
    # with untied MLPs in the repeat, sequential two-lane residuals from layer 7, no attention in layer 0,
    # QK gain 4.0, BigramHash 2816 x 112, SmearGate, value embeddings on layers 9-10, plain skips, Muon
    # without row normalisation (MuonEq-R came later) at the record's code defaults (lr 0.025, momentum
    # 0.99, weight decay 0.04), warm-down 3500 of its ~6,240 steps.
    # Calibration: the record sampled 64 sequences x 2048 tokens in batches of 8 for ~240 s after the loop,
    # ~30 s per batch of 8 (2048 uncached forward passes each). Here GPTQ_CALIBRATION_BATCHES is sequences
    # per rank, so 8 per rank is one such batch (~30 s), and 8 ranks together still sample the record's 64
    # sequences; the reserve is measured before the loop (GPTQ_RESERVE_SECONDS=0). Matrices are int5 or int6
    # by Hessian trace (GPTQ_MIXED_BITS).
    "pr1204": dict(DATA_PATH="./data/datasets/fineweb10B_sp1024",
                   TOKENIZER_PATH="./data/tokenizers/fineweb_1024_bpe.model", VOCAB_SIZE=1024, MLP_MULT=3.0,
                   NUM_LOOPS=1, LOOP_START=4, LOOP_END=5, ENABLE_LOOPING_AT_STEP=3000,
                   UNTIE_LOOP_MLP=True, PARALLEL_RESIDUAL_MODE="sequential", PARALLEL_RESIDUAL_START=7,
                   ATTN_OFF_LAYERS="0", QK_GAIN_INIT=4.0, BIGRAM_HASH_BUCKETS=2816, BIGRAM_HASH_DIM=112,
                   SMEAR_GATE=True, VALUE_EMBED_LAYERS="9,10", VALUE_EMBED_DIM=128, SKIP_GATES_ENABLED=False,
                   MATRIX_LR=0.025, SCALAR_LR=0.025, TIED_EMBED_LR=0.035, MUON_MOMENTUM=0.99,
                   MUON_ROW_NORMALIZE=False, MUON_WD=0.04, ADAM_WD=0.04, EMBED_WD=0.04, WARMDOWN_FRAC=0.56,
                   TTT_ENABLED=False, GPTQ_CALIBRATION="selfgen", GPTQ_CALIBRATION_BATCHES=8,
                   GPTQ_MIXED_BITS="5,6"),
    # The later records' techniques (frontier.md 1.4) on pr1529, as the ablation (tools/ablate.py) defines them.
    # Provisional: a feature stays while it measures no worse on the proxy (README, Ablations).
    # Training, 300 proxy steps, EMA 0.955, 2 seeds (records/proxy_1gpu_h100_2026-12-06_ema0955/): SmearGate
    # with the BOS mask -0.0084 bpb, Polar Express -0.0082, the LR floor -0.0020, and (2026-12-07) #2014's
    # progressive context, 1024 -> 2048 at 10% -> 3072 at 70% of training, -0.0111 (1.8% longer training time),
    # and document-masked attention (DOC_MASK, as every record from #1530 on), -0.0342 with a 5% shorter step.
    # The proxy's documents are short (354 tokens on average, FineWeb's validation documents 811), so that gain
    # overstates the challenge's: #1530 measured about 0.001 nats on FineWeb.
    # Left out: #1855's warm-down 0.85 and BETA2 0.99 (+0.0169), the sparse attention gate (+0.0022, seeds
    # +0.0046 and -0.0002) and #1855's clip sigmas (-0.0000, and 680 KB over the limit with this stack's int8
    # embedding).
    # Evaluation, one artifact, 782 proxy documents (records/proxy_1gpu_h200_2026-12-06_eval/): LoRA TTT is
    # +0.0012 against chunk TTT alone, and its refinements gain against it: short-document chunks -0.0015,
    # #1767/#1855's alpha, rank and decay -0.0007, one phase -0.0002, warm-started A -0.0000. The n-gram tilt
    # hinted 0.0001 of that prefix's targets, so it stays unmeasured there (the records: -0.00014). Left out:
    # context 2560 (+0.0005) and no Q/V adapters (+0.0002). Whether the LoRA stack beats chunk TTT together is
    # the ablation's frontier_eval row, not yet run.
    "frontier": dict(SMEAR_GATE=True, MIN_LR=0.1, MUON_NS_COEFFS="polar_express",
                     TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE="1024@0,2048@0.1,3072@0.7", DOC_MASK=True,
                     TTT_MODE="lora", SLIDING_WINDOW_ENABLED=False, TTT_LORA_RESET="b_only", TTT_LORA_ALPHA=144.0,
                     TTT_LORA_RANK=80, TTT_LORA_WD=1.0, TTT_SHORT_DOC_TOKENS=256, TTT_SHORT_DOC_CHUNK_SIZE=8,
                     TTT_PHASES=1, NGRAM_TILT=True),
}


def preset_changes(s: Settings) -> list:
    """(name, value) of every setting whose value differs from the project default (RUN_ID aside):
    what the preset and the environment changed."""
    return [(x.name, getattr(s, x.name.lower())) for x in SETTINGS
            if x.name not in ("RUN_ID", "PRESET") and getattr(s, x.name.lower()) != x.default]


def layer_list(text: str, name: str, num_layers: int) -> tuple:
    """"9,10" -> (9, 10); a one-line error for anything but distinct physical layer indices."""
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{name}={text!r} must be comma-separated layer numbers, e.g. {name}=9,10") from None
    need(all(0 <= i < num_layers for i in layers) and len(set(layers)) == len(layers),
         f"{name}={text} must name distinct layers between 0 and NUM_LAYERS-1={num_layers - 1}")
    return layers


def seq_schedule(s) -> tuple:
    """TRAIN_SEQ_SCHEDULE "1024@0,2048@0.3,3072@0.6" -> ((0.0, 1024), (0.3, 2048), (0.6, 3072)): (start
    fraction, window length) per phase; off ('') -> ((0.0, TRAIN_SEQ_LEN),). One-line errors for anything else."""
    text = s.train_seq_schedule
    if not text.strip():
        return ((0.0, s.train_seq_len),)
    example = "e.g. TRAIN_SEQ_SCHEDULE=1024@0,2048@0.3,3072@0.6"
    try:
        pairs = [item.split("@") for item in text.split(",")]
        phases = tuple((float(frac), int(length)) for length, frac in pairs)
    except ValueError:
        raise UserError(f"TRAIN_SEQ_SCHEDULE={text!r} must be comma-separated length@fraction pairs, "
                        f"{example}") from None
    fracs, lengths = [f for f, _ in phases], [n for _, n in phases]
    need(fracs[0] == 0.0, f"TRAIN_SEQ_SCHEDULE={text} must start at fraction 0 (the length of the first steps), "
                          f"{example}")
    need(all(a < b for a, b in zip(fracs, fracs[1:])) and fracs[-1] < 1.0,
         f"TRAIN_SEQ_SCHEDULE={text}: the fractions must increase and stay below 1, {example}")
    need(lengths[0] >= 1 and all(a < b for a, b in zip(lengths, lengths[1:])),
         f"TRAIN_SEQ_SCHEDULE={text}: the lengths must be positive and increase, {example}")
    need(lengths[-1] == s.train_seq_len,
         f"TRAIN_SEQ_SCHEDULE={text} ends at {lengths[-1]} but TRAIN_SEQ_LEN={s.train_seq_len}: set TRAIN_SEQ_LEN="
         f"{lengths[-1]} (the final length is the one RoPE, calibration and evaluation reference)")
    for length in lengths:
        need(s.train_batch_tokens % (8 * length) == 0,
             f"TRAIN_SEQ_SCHEDULE length {length}: TRAIN_BATCH_TOKENS={s.train_batch_tokens} must be a multiple of "
             f"8*{length}={8 * length} (8 = the largest world size: the step's windows do not depend on the GPU "
             f"count)")
    return phases


def schedule_phase(phases: tuple, frac: float) -> int:
    """Index of the TRAIN_SEQ_SCHEDULE phase that training fraction `frac` falls in."""
    return max(i for i, (start, _) in enumerate(phases) if start <= frac)


class UserError(Exception):
    """Bad input or an impossible setting: reported as one line, exit status 1.

    Most are found the same way by every rank (settings, files, collective checks), so rank 0 alone
    prints them; `rank_local` marks one that only the rank raising it can know (its own data)."""

    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local


def need(ok: bool, message: str):
    """Stop with a one-line error unless ok."""
    if not ok:
        raise UserError(message)


def parse_bounds(text: str) -> tuple:
    """"[2, 8]" -> (2.0, 8.0, True, True): low, high, whether each end is included."""
    lo, hi = (float(x) for x in text[1:-1].split(","))
    return lo, hi, text[0] == "[", text[-1] == "]"


def in_bounds(value, text: str) -> bool:
    lo, hi, lo_in, hi_in = parse_bounds(text)
    return (lo < value or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))


def _parse_setting(setting: Setting, raw: str):
    kind = type(setting.default)
    fix = f"set {setting.name} to a {kind.__name__}"
    if setting.choices:
        fix += f" (one of {', '.join(setting.choices)})"
    try:
        if kind is bool:
            if raw.strip().lower() not in ("0", "1", "true", "false"):
                raise ValueError
            value = raw.strip().lower() in ("1", "true")
        elif kind is int:
            as_float = float(raw)  # accepts 786432 as well as 7.86432e5
            if not as_float.is_integer():
                raise ValueError
            value = int(as_float)
        elif kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
        else:
            value = raw
    except ValueError:
        raise UserError(f"{setting.name}={raw!r} is not valid: {fix}") from None
    if setting.choices and value not in setting.choices:
        raise UserError(f"{setting.name}={raw!r} is not one of {', '.join(setting.choices)}")
    if setting.bounds and not in_bounds(value, setting.bounds):
        raise UserError(f"{setting.name}={raw} is out of range: set it to a value in {setting.bounds}")
    return value


# Environment variables that belong to other tools: never taken for a misspelled setting.
FOREIGN_PREFIXES = ("CUDA", "NCCL", "TORCH", "PYTORCH", "TRITON", "NVIDIA", "CUTLASS", "CUDNN", "CUBLAS", "OMP", "MKL",
                    "KMP", "OPENBLAS", "PYTHON", "PYTEST", "HF_", "HUGGINGFACE", "MASTER_", "LC_", "XDG", "GROUP_",
                    "ROLE_", "LOCAL_", "TORCHELASTIC", "SLURM", "OMPI", "PMI", "PIP", "VIRTUAL_ENV", "CONDA")
FOREIGN_NAMES = {"RANK", "WORLD_SIZE", "SEEDS", "NPROC", "PATH", "HOME", "PWD", "OLDPWD", "SHELL", "USER", "TERM",
                 "LANG"}


def misspelled_settings(environ) -> list:
    """(variable, setting) pairs for environment variables that are not settings but nearly spell one
    (NUM_LAYER for NUM_LAYERS): a typo would otherwise run the default silently."""
    import difflib
    found = []
    for var in environ:
        if var in SETTINGS_BY_NAME or var in FOREIGN_NAMES or var.startswith(FOREIGN_PREFIXES) or not var.isupper():
            continue
        close = difflib.get_close_matches(var, SETTINGS_BY_NAME, n=1, cutoff=0.85)
        if close:
            found.append((var, close[0]))
    return found


# =================================================================================================
# RUNTIME: logging and distributed set-up
# =================================================================================================


def check_writable_folder(folder: Path, what: str):
    """Create folder if needed and prove a file can be written there, before any work is done."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what}: {folder} is a file, not a folder: choose another path")
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what}: cannot write to {folder} ({e.strerror}): choose a writable folder or free space "
                        "there") from None


def check_output_file(path: Path, what: str):
    if path.is_dir():
        raise UserError(f"{what}={path} is a folder: give a file path, e.g. {path / 'model.ptz'}")
    check_writable_folder(path.parent, what)


def artifact_path(s: Settings) -> Path:
    return Path(s.artifact_path) if s.artifact_path else Path(s.log_dir) / f"{s.run_id}.ptz"


def prepare_outputs(s: Settings, dry_run: bool = False) -> Path:
    """The log path, after proving that every file the run will write can be written (LOG_DIR, the artifact,
    SAVE_CHECKPOINT) and that RUN_ID does not name an earlier run's files (unless OVERWRITE=1, which
    removes the old log here; the artifact is replaced when the new one is written)."""
    log_dir = Path(s.log_dir)
    check_writable_folder(log_dir, f"LOG_DIR={log_dir}")
    log_path = log_dir / f"{s.run_id}.txt"
    outputs = [log_path]
    if not s.eval_only:
        check_output_file(artifact_path(s), "ARTIFACT_PATH")
        outputs.append(artifact_path(s))
    if s.save_checkpoint:
        check_output_file(Path(s.save_checkpoint), "SAVE_CHECKPOINT")
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not s.overwrite:
        raise UserError(f"RUN_ID={s.run_id} was used before ({', '.join(existing)} exists): choose another RUN_ID, "
                        f"or set OVERWRITE=1 to replace that run's files")
    if existing and not dry_run and log_path.exists():
        log_path.unlink()
    return log_path


class Runtime:
    """Rank, world size, device and the run log. Only rank 0 writes the log file. A dry run (--check)
    proves the outputs writable but writes no log."""

    def __init__(self, settings: Settings, dry_run: bool = False):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.grad_accum = settings.validate(self.world_size)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=self.device if backend == "nccl" else None)
        self.master = self.rank == 0
        self.log_path = None
        self.past_setup = False  # set once the checks are done and training (or scoring) begins
        if self.master:
            log_path = prepare_outputs(settings, dry_run)
            self.log_path = None if dry_run else log_path  # a dry run (--check) only prints

    def log(self, msg: str = "", console: bool = True):
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        if self.log_path is None:
            return
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")
        except OSError as e:
            raise UserError(f"cannot append to the log {self.log_path} ({e.strerror}): free space on that disk "
                            f"or set LOG_DIR to another one") from None

    def log_failure(self, trace: str):
        """An unexpected exception's traceback, into the log (not the console, where Python prints it): a
        log copied off a machine then says why its run stopped. The traceback is indented, so the log's
        parsers skip it as they skip the header's indented blocks. Rank 0 writes the log, so another rank's
        failure shows only in its own stderr. A log that cannot be written any more (a full disk) is only
        reported: its error must not replace the exception that stopped the run, which the caller re-raises."""
        try:
            self.log("failure:traceback", console=False)
            self.log("\n".join("  " + line for line in trace.rstrip().splitlines()), console=False)
        except UserError as e:
            print(f"error: the traceback below is not in the log: {e}", file=sys.stderr, flush=True)

    def discard_log_of_a_run_that_never_started(self):
        """A run refused by a start-up check trained nothing: its log (the header and the error) goes, so
        that the same command, corrected, can run under the same RUN_ID without OVERWRITE=1."""
        if self.master and self.log_path is not None and not self.past_setup:
            self.log_path.unlink(missing_ok=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        if self.distributed:
            dist.all_reduce(tensor, op=op)
        return tensor

    def close(self, finished: bool = False):
        """Destroy the process group. After a finished run every rank first meets the others at a barrier:
        without it, a rank that tore its gloo connections down while its peer was still finishing made that
        peer abort at exit ("terminate called without an active exception", SIGABRT after the run's last log
        line), in 9 of 24 two-process CPU runs (torch 2.13, 2026-12-06); with it, in none of 24, but in 1 of 8
        in CI on 2026-12-07, so main() then also skips the interpreter's finalization. After a failure there
        is no barrier: the other ranks may never reach it."""
        if self.distributed and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def source_sha256() -> str:
    """Hash of the source that runs: this file, or the shipped code when the packed stub runs."""
    return hashlib.sha256(running_source().encode("utf-8")).hexdigest()


# --- the run log ------------------------------------------------------------------------------------
# A log is a header, then one event per line. The header holds the settings, versions, git revision,
# nvidia-smi and the whole readable source (indented two spaces; the file only, not the console) and
# ends with the line `header:end`. Each event line is `name key:value key:value ...`: a few name words
# (no colon), then fields whose values hold no spaces; a line that starts with a field is named by
# that field's key (`step:12/20 train_loss:...` is a "step" event). Lines starting with "WARNING:" are
# free text for people. tools/runlog.py (split_line) is the one reader; tests/test_logs.py holds every
# line of a real run to this form.
HEADER_END = "header:end"


def schedule_text(schedule) -> str:
    return ",".join(map(str, schedule))


def git_revision() -> str:
    """The commit this file belongs to and whether it differs from it ("none" outside a git checkout)."""
    import subprocess
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "none"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", Path(__file__).name], cwd=here, timeout=5)
        return f"{rev.stdout.strip()}{'+dirty' if dirty.returncode else ''}"
    except (OSError, subprocess.SubprocessError):
        return "none"


def nvidia_smi() -> str:
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed, or installed without metadata
        return "none"


def compiled(fn, enabled: bool, dynamic: bool | None = False, mode: str = "default"):
    """The one torch.compile of the script: fn as a single graph (fullgraph, so a graph break is an error,
    not a silent slowdown), static shapes unless dynamic=None (LoRA TTT marks its own dynamic dims).
    mode (COMPILE_MODE, the training step only): default; coordinate = inductor's coordinate-descent tuning
    of its fused kernels' launch configs; max-autotune = Triton GEMM templates benchmarked against cuBLAS,
    so that neighbouring elementwise work can fuse into a GEMM's epilogue (minutes more compile time).
    Not enabled (COMPILE=0) returns fn itself."""
    if not enabled:
        return fn
    options = {"coordinate": {"coordinate_descent_tuning": True},
               "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True}}.get(mode)
    graph = torch.compile(fn, dynamic=dynamic, fullgraph=True, options=options)
    if not isinstance(fn, nn.Module):  # (on a module it would register fn as a submodule of the wrapper)
        graph.eager = fn  # for a shape met once, where compiling costs more than it saves (score_windows)
    return graph


class Timer:
    seconds = 0.0


@contextlib.contextmanager
def timed(rt: "Runtime"):
    """Wall seconds of the work inside the block, queued GPU work included (synchronised at both ends):
    `with timed(rt) as t: ...`, then t.seconds."""
    timer = Timer()
    rt.sync()
    t0 = time.perf_counter()
    try:
        yield timer
    finally:
        rt.sync()
        timer.seconds = time.perf_counter() - t0


def log_header(s: Settings, rt: Runtime):
    """What ran, so that the log alone tells it: settings, source hash, git revision, versions, the GPUs
    (nvidia-smi) and the readable source itself (file only)."""
    rt.log("Hyperparameters:")
    for name, value in sorted(s.items()):
        rt.log(f"  {name}: {value}")
    source = running_source()
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or "cpu"
    rt.log(f"source_sha256: {source_sha256()}")
    # the same for this file and for its packed form: what a submission's runs are compared by
    rt.log(f"shipped_sha256: {hashlib.sha256(shipping_source(source).encode('utf-8')).hexdigest()}")
    rt.log(f"git_revision: {git_revision()}")
    rt.log(f"versions: python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda} "
           f"triton:{package_version('triton')} numpy:{np.__version__}")
    rt.log(f"device: {device}")
    rt.log(f"world_size: {rt.world_size} grad_accum_steps: {rt.grad_accum}")
    smi = nvidia_smi()
    if smi:
        rt.log("nvidia-smi:", console=False)
        rt.log("\n".join("  " + line for line in smi.rstrip().splitlines()), console=False)
    rt.log(f"source: {Path(__file__).name} lines:{source.count(chr(10))}", console=False)
    rt.log("\n".join("  " + line for line in source.splitlines()), console=False)
    rt.log(HEADER_END)
    changes = preset_changes(s)
    rt.log(f"preset name:{s.preset} changed:{len(changes)} settings:{','.join(n for n, _ in changes) or 'none'}")
    for name, value in changes:
        rt.log(f"preset:changed setting:{name} value:{log_value(value)} "
               f"default:{log_value(SETTINGS_BY_NAME[name].default)}")


def log_value(value) -> str:
    """A setting's value as one log word: "" for an empty string, spaces as %20."""
    return str(value).replace(" ", "%20") if str(value) else '""'




# =================================================================================================
# DATA: challenge shards, training windows, validation tokens
# =================================================================================================
# A shard is 256 little-endian int32 header words (magic 20240520, version 1, token count) followed
# by the tokens as little-endian uint16. Each document is [BOS] + tokens; documents run on across
# windows and shard boundaries.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_WORDS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_WORDS * 4


def path_problem(path) -> str:
    """Why path cannot be read as a file ("" if it can): a folder, a broken link, a FIFO... each said as such."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"is a broken symbolic link (to {os.readlink(path)})"
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a folder, not a file"
    if not path.is_file():
        return "is not a regular file (a FIFO, socket or device)"
    if not os.access(path, os.R_OK):
        return "is not readable (permissions)"
    return ""


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str, rank_local: bool = False):
    """Stop on an id the embedding does not have: on a GPU it would abort the process mid-run."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(tokens.max())
        raise UserError(f"{where} holds token id {bad} >= VOCAB_SIZE={vocab_size}: the shards were made with another "
                        f"tokenizer; set VOCAB_SIZE/TOKENIZER_PATH to the ones the shards were made with, or rebuild "
                        "the shards",
                        rank_local)


def read_shard(path, mmap: bool = True) -> np.ndarray:
    """The tokens of one shard as a uint16 array (memory-mapped), after checking its header and size."""
    path = Path(path)
    fix = "re-download it (data/cached_challenge_fineweb.py) or rebuild it (data/build_shards.py)"
    problem = path_problem(path)
    if problem:
        raise UserError(f"shard {path} {problem}: {fix}")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise UserError(f"shard {path} is {size} bytes, shorter than its {SHARD_HEADER_BYTES}-byte header: {fix}")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_WORDS)
    if header[0] != SHARD_MAGIC:
        raise UserError(f"shard {path} has magic {header[0]}, expected {SHARD_MAGIC}: not a challenge shard; {fix}")
    if header[1] != SHARD_VERSION:
        raise UserError(f"shard {path} has version {header[1]}, expected {SHARD_VERSION}: {fix}")
    n_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise UserError(f"shard {path} is {size} bytes but its header promises {n_tokens} tokens ({expected} bytes): "
                        f"truncated or corrupt; {fix}")
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n_tokens,))
    return np.fromfile(path, dtype="<u2", offset=SHARD_HEADER_BYTES, count=n_tokens)


def write_shard(path, tokens) -> None:
    """Write tokens in the challenge format (used by tests; data/ has the real builders)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise UserError(f"token ids for {path} must fit in uint16")
    header = np.zeros(SHARD_HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def shard_files(data_path: str, split: str) -> list[str]:
    if not Path(data_path).is_dir():
        what = "is a file, not a folder" if Path(data_path).exists() else "does not exist"
        raise UserError(f"DATA_PATH={data_path} {what}: download the shards with "
                        f"`python3 data/cached_challenge_fineweb.py --variant sp8192` or point DATA_PATH at the "
                        f"folder that holds them")
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise UserError(f"no fineweb_{split}_*.bin shards in DATA_PATH={data_path}: download them with "
                        f"`python3 data/cached_challenge_fineweb.py --variant sp8192` or point DATA_PATH at your "
                        "shards")
    return files


class TrainLoader:
    """Random training windows of TRAIN_SEQ_LEN+1 tokens, the same global batches for any GPU count.

    Every epoch draws, from SEED and the epoch number, a random phase per shard (so window edges move
    between epochs) and one permutation of all windows of all shards. Step s consumes the next
    `global_seqs` windows of that permutation; rank r's micro-batch m is slice (m * world_size + r).
    So a rank reads only its own windows, and 1 GPU with 8 accumulation steps sees exactly the same
    global batch as 8 GPUs with 1.
    """

    def __init__(self, files, seq_len: int, global_seqs: int, seed: int, rank: int, world_size: int, grad_accum: int,
                 vocab_size: int = 2**16):
        self.files, self.vocab_size = list(files), vocab_size
        self.tokens = [read_shard(f) for f in files]
        self.seq_len, self.seed = seq_len, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.global_seqs = global_seqs
        self.micro_seqs = global_seqs // (world_size * grad_accum)
        self.total_tokens = sum(len(t) for t in self.tokens)  # what one pass over the training data reads
        self.epoch = -1
        self._start_epoch()
        if len(self.order) < global_seqs:
            raise UserError(f"training shards hold {len(self.order)} windows of {seq_len + 1} tokens, fewer than one "
                            f"batch of {global_seqs}: lower TRAIN_BATCH_TOKENS/TRAIN_SEQ_LEN or add training shards")

    def _start_epoch(self):
        self.epoch += 1
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
        shard_ids, starts = [], []
        for i, toks in enumerate(self.tokens):
            n = len(toks)
            if n < self.seq_len + 1:
                continue
            phase = int(rng.integers(0, min(self.seq_len, n - self.seq_len - 1) + 1))
            count = (n - 1 - phase) // self.seq_len
            shard_ids.append(np.full(count, i, dtype=np.int32))
            starts.append(phase + self.seq_len * np.arange(count, dtype=np.int64))
        self.shard_ids = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.order = rng.permutation(len(self.starts))
        self.cursor = 0

    def require_batch(self, seq_len: int, global_seqs: int):
        """Stop unless every epoch at seq_len holds a batch of global_seqs windows, whatever its phases."""
        fewest = sum((len(t) - 1 - min(seq_len, len(t) - seq_len - 1)) // seq_len
                     for t in self.tokens if len(t) >= seq_len + 1)
        if fewest < global_seqs:
            raise UserError(f"training shards hold {fewest} windows of {seq_len + 1} tokens, fewer than one batch "
                            f"of {global_seqs}: lower TRAIN_BATCH_TOKENS or the TRAIN_SEQ_SCHEDULE lengths, or add "
                            "training shards")

    def set_seq_len(self, seq_len: int, global_seqs: int, unread_steps: int = 0):
        """From the next step on, hand out `global_seqs` windows of seq_len+1 tokens (TRAIN_SEQ_SCHEDULE).

        The last `unread_steps` steps handed out were never trained on (a batch prefetched at the old
        length): their windows count as unread. The rest of this epoch is cut from the unread text only:
        every run of neighbouring unread windows (contiguous tokens of one shard) is re-cut into windows
        of the new length, and those are permuted (seeded by SEED, the epoch and the length). So a switch
        repeats no token of the epoch; the tail of each run shorter than a new window waits for the next
        epoch, which starts from a fresh table at the new length."""
        self.require_batch(seq_len, global_seqs)
        self.cursor -= unread_steps * self.global_seqs
        assert self.cursor >= 0, "unread_steps exceeds the steps of this epoch"
        # Whole-table shifted comparisons, no gathers: this runs inside the timed loop.
        unread = np.ones(len(self.starts), dtype=bool)  # the table is in text order: by shard, then by start
        unread[self.order[:self.cursor]] = False
        continues = np.zeros(len(self.starts) + 1, dtype=bool)  # unread window i continues unread window i-1
        continues[1:-1] = unread[:-1] & unread[1:] & (self.shard_ids[1:] == self.shard_ids[:-1]) & \
                          (self.starts[1:] == self.starts[:-1] + self.seq_len)
        heads = np.flatnonzero(unread & ~continues[:-1])
        tails = np.flatnonzero(unread & ~continues[1:])
        new_per_run = (tails - heads + 1) * self.seq_len // seq_len
        offsets = np.arange(new_per_run.sum()) - np.repeat(np.cumsum(new_per_run) - new_per_run, new_per_run)
        self.shard_ids = np.repeat(self.shard_ids[heads], new_per_run)
        self.starts = np.repeat(self.starts[heads], new_per_run) + seq_len * offsets
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, seq_len]))
        self.order = rng.permutation(len(self.starts))
        self.cursor = 0
        self.seq_len, self.global_seqs = seq_len, global_seqs
        self.micro_seqs = global_seqs // (self.world_size * self.grad_accum)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's grad_accum micro-batches for the next step, each [micro_seqs, seq_len+1] int64."""
        if self.cursor + self.global_seqs > len(self.order):
            self._start_epoch()
        step_windows = self.order[self.cursor:self.cursor + self.global_seqs]
        self.cursor += self.global_seqs
        batches = []
        for m in range(self.grad_accum):
            part = (m * self.world_size + self.rank) * self.micro_seqs
            ids = step_windows[part:part + self.micro_seqs]
            rows = np.stack([self.tokens[self.shard_ids[w]][self.starts[w]:self.starts[w] + self.seq_len + 1]
                             for w in ids])
            if rows.size and int(rows.max()) >= self.vocab_size:  # a few microseconds on the host, per micro-batch
                w = ids[int(np.argmax(rows.max(axis=1)))]
                check_token_range(rows, self.vocab_size, f"training shard {self.files[self.shard_ids[w]]} "
                                  f"(window at token {self.starts[w]})", rank_local=True)
            batches.append(torch.from_numpy(rows.astype(np.int64)))
        return batches


def load_validation_tokens(data_path: str, seq_len: int, vocab_size: int = 2**16, max_docs: int = 0,
                           bos_id: int = 1) -> torch.Tensor:
    """All validation shards in name order, cut to a whole number of seq_len windows (+1 for the last target),
    every id checked against the vocabulary. max_docs > 0 keeps only the first max_docs documents (each
    starts at a bos_id token) before that cut."""
    shards = []
    for f in shard_files(data_path, "val"):
        shards.append(read_shard(f, mmap=False))
        check_token_range(shards[-1], vocab_size, f"validation shard {f}")
    tokens = np.concatenate(shards)
    if max_docs > 0:
        starts = np.flatnonzero(tokens == bos_id)
        if len(starts) > max_docs:
            tokens = tokens[:starts[max_docs]]
    usable = ((len(tokens) - 1) // seq_len) * seq_len
    if usable <= 0:
        raise UserError(f"validation shards in DATA_PATH={data_path} hold {len(tokens)} tokens, fewer than one "
                        f"EVAL_SEQ_LEN={seq_len} window + 1: lower EVAL_SEQ_LEN or use the full validation split")
    return torch.from_numpy(tokens[:usable + 1].astype(np.int64))


def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm
    problem = path_problem(path)
    if problem:
        raise UserError(f"TOKENIZER_PATH={path} {problem}: download it with data/cached_challenge_fineweb.py or set "
                        "TOKENIZER_PATH")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with long messages
        raise UserError(f"TOKENIZER_PATH={path} is not a SentencePiece model ({type(e).__name__})") from None
    if sp.vocab_size() != vocab_size:
        raise UserError(f"tokenizer {path} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}: set "
                        f"VOCAB_SIZE={sp.vocab_size()} "
                        f"or use the tokenizer the shards were made with")
    return sp


# =================================================================================================
# MODEL
# =================================================================================================
# Matrices keep fp32 master weights and are cast to the compute dtype (bf16 on GPU) at use; the
# residual stream runs in the compute dtype. Every forward pass (training, evaluation, sliding
# window, TTT) goes through GPT.forward_hidden, so eval-only features (hash embedding, LoRA adapters)
# plug into the same code the model was trained with.


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Module):
    """Bias-free linear layer; the fp32 weight is cast to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if zero_init:  # output projections start at zero so each block starts as the identity
            nn.init.zeros_(self.weight)
        else:
            nn.init.orthogonal_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def rope_tables(seq_len: int, rope_dims: int, base: float, train_seq_len: int, device, dtype):
    """cos/sin [seq_len, rope_dims/2] for the split-half convention (pairs j and j + rope_dims/2).
    seq_len must be a plain int: inside a graph whose width is symbolic, the stretch's branch would guard on
    the width and its arithmetic would make a symbolic float (a GPU compile failure, one H100, 2026-12-06),
    so LoRA TTT computes its tables outside its graph (lora_losses)."""
    if seq_len > train_seq_len:  # NTK-style base stretch for contexts longer than training
        base = base * (seq_len / train_seq_len) ** (rope_dims / max(rope_dims - 2, 1))
    inv_freq = base ** (-torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.size(-1) dims of each head of x [B, T, H, D]; the rest pass through."""
    half = cos.size(-1)
    if half == 0:
        return x
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos, rest), dim=-1)


def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: remove from each head's output its component along its own position's value vector.

    y [B, T, H, D] attention output; v [B, T, Hkv, D]; query head h uses KV head h // (H / Hkv)."""
    B, T, H, D = y.shape
    kv = v.size(2)
    y = y.view(B, T, kv, H // kv, D)
    v_hat = F.normalize(v, dim=-1).unsqueeze(3)
    y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
    return y.view(B, T, H, D)


# --- the fused q/k RMS norm + partial RoPE (QK_KERNEL) -----------------------------------------------
# Every attention layer RMS-normalises each query and key head, rotates its first ROPE_DIMS dims and scales
# the queries by their head's gain. Compiled, inductor runs this chain's backward as one kernel per tensor that
# moved about 0.75 TB/s on the H200, a sixth of the memory's rate: 53 ms of a 747 ms step (docs/performance.md,
# 2026-12-03), the slowest memory-bound kernels of the step per byte. QK_KERNEL=triton runs it as one Triton
# pass per tensor forward and one backward, a block of head vectors per program: rows are (b, t, h), h fastest.
# RoPE written per column: out_j = n_j * C_j + n_p(j) * S_j, where p(j) is j's partner (j + half in the first
# half of the rotated dims, j - half in the second, j itself beyond), C_j the pair's cosine (1 beyond) and S_j
# +sine in the first half, -sine in the second (0 beyond). Its transpose is dn_j = dy_j * C_j - dy_p(j) * S_j.
# The head size D and the RoPE half are compile-time constants. That is what lets Triton see that the partner
# columns, the cos/sin columns and the masks are constant or contiguous over runs of 8, so every load and store
# of a head vector is a 16-byte vector; the partner load hits the cache lines the row's own load brought in.
# (The first version took D and half at run time: every value became its own 2-byte load, and on an H100 the
# kernels ran slower than inductor's chain, 1.62 against 1.03 ms a layer and micro-batch. tests/test_qk_kernel.py
# now reads the PTX for scalar loads.)
# The plain path (rms_norm, apply_partial_rope, the gain) is the reference; it alone runs in evaluation, TTT
# and on CPU. rms_norm's epsilon is float32's whatever the input dtype (ATen adds it in fp32 opmath).
# Under TRITON_INTERPRET=1 the op also runs on CPU tensors (slowly, in Triton's interpreter): that is how the
# tests run a whole training step, compiled, through it on a machine without a GPU.

triton = tl = None  # bound on first use by the triton_* definers below: a CPU machine need not have Triton
_TRITON_QK_NORM_ROPE = None  # the op once defined; False when Triton does not import
RMS_NORM_EPS = torch.finfo(torch.float32).eps


def _qk_rows(T, H, stride_b, stride_t, stride_h, n_rows, BLOCK_R: tl.constexpr):
    """This program's rows, which of them exist, their position t, head h and element offset in the tensor."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = rows % H
    t = (rows // H) % T
    b = rows // (H * T)
    offset = b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t + h.to(tl.int64) * stride_h
    return rows, rows < n_rows, t, h, offset


def _qk_rope_columns(cos_ptr, sin_ptr, t, mask, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """The columns of a row, each one's RoPE partner, and C and S ([rows, BLOCK_D] fp32) at positions t."""
    cols = tl.arange(0, BLOCK_D)
    partner = tl.where(cols < HALF, cols + HALF, tl.where(cols < 2 * HALF, cols - HALF, cols))
    table = t.to(tl.int64)[:, None] * HALF + tl.where(cols < HALF, cols, cols - HALF)[None, :]
    rotated = mask & (cols < 2 * HALF)[None, :]
    c = tl.load(cos_ptr + table, mask=rotated, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + table, mask=rotated, other=0.0).to(tl.float32)
    return cols, partner, c, tl.where((cols < HALF)[None, :], s, -s)


def _qk_norm_rope_forward_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, n_rows, T, H,
                                 stride_b, stride_t, stride_h, eps, D: tl.constexpr, HALF: tl.constexpr,
                                 HAS_GAIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out [B, T, H, D] contiguous = gain_h * rope(rms_norm(x)) for x [B, T, H, D] with unit stride in D."""
    rows, row_ok, t, h, src = _qk_rows(T, H, stride_b, stride_t, stride_h, n_rows, BLOCK_R)
    mask = row_ok[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]
    cols, partner, c, s = _qk_rope_columns(cos_ptr, sin_ptr, t, mask, HALF, BLOCK_D)
    x = tl.load(x_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(x_ptr + src[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    out = (x * c + x_partner * s) * r[:, None]
    if HAS_GAIN:
        out = out * tl.load(gain_ptr + h, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dst = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _qk_norm_rope_backward_kernel(x_ptr, dy_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, dgain_ptr, n_rows, T, H,
                                  x_stride_b, x_stride_t, x_stride_h, dy_stride_b, dy_stride_t, dy_stride_h,
                                  eps, D: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx [B, T, H, D] contiguous from dy = d out; with a gain, each row's share of d gain_h into dgain [rows]
    (summed per head afterwards: no atomics, so the sum is the same on every run)."""
    rows, row_ok, t, h, x_src = _qk_rows(T, H, x_stride_b, x_stride_t, x_stride_h, n_rows, BLOCK_R)
    _, _, _, _, dy_src = _qk_rows(T, H, dy_stride_b, dy_stride_t, dy_stride_h, n_rows, BLOCK_R)
    mask = row_ok[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]
    cols, partner, c, s = _qk_rope_columns(cos_ptr, sin_ptr, t, mask, HALF, BLOCK_D)
    x = tl.load(x_ptr + x_src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + dy_src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy_partner = tl.load(dy_ptr + dy_src[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    n = x * r[:, None]
    dn = dy * c - dy_partner * s
    if HAS_GAIN:
        x_partner = tl.load(x_ptr + x_src[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        rotated = (x * c + x_partner * s) * r[:, None]
        tl.store(dgain_ptr + rows, tl.sum(dy * rotated, axis=1), mask=row_ok)
        dn = dn * tl.load(gain_ptr + h, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    # rms_norm's backward: n = x r with r = (mean(x^2) + eps)^-1/2 gives dx = r (dn - n mean(dn n))
    dx = r[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
    dst = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(dx_ptr + dst, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# autotuned (rows per program, num_warps): 8 or 16 values of a 64-wide head a thread (with 32, ptxas spilled).
# tests/test_qk_kernel.py compiles each config for sm_90a and checks that none spills and that every load and
# store of a head vector is a 16-byte one
_QK_CONFIGS = ((8, 2), (16, 4), (32, 8), (64, 16), (16, 2), (64, 8))


class FixedMeta:
    """A jitted kernel launched with fixed meta-parameters, indexed by a grid function as an autotuned one is:
    Triton's interpreter cannot time configs, and the tests pick a block size on purpose."""

    def __init__(self, kernel, **meta):
        self.kernel, self.meta = kernel, meta

    def __getitem__(self, grid):
        return functools.partial(self.kernel[grid(self.meta)], **self.meta)


def qk_norm_rope_launchers(forward_kernel, backward_kernel):
    """(forward, backward): plain functions that run the two kernels (jitted or autotuned) on tensors of any
    device Triton runs on (the CPU under TRITON_INTERPRET=1, for the tests).
    forward(x [B, T, H, D], cos, sin [T, half], gain [H] or None) -> out [B, T, H, D] contiguous
    backward(dy, x, cos, sin, gain) -> (dx, dgain or None)"""

    def geometry(x, cos):
        """Rows, T, H, and the compile-time shape: D, the RoPE half and D's power-of-two block."""
        B, T, H, D = x.shape
        half = cos.size(1)
        torch._check(cos.size(0) >= T and cos.is_contiguous(), lambda: "qk_norm_rope: a cos/sin row per position")
        shape = dict(D=D, HALF=half, BLOCK_D=triton.next_power_of_2(D))
        return B * T * H, T, H, shape

    def unit_last(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    def forward(x, cos, sin, gain):
        x = unit_last(x)
        n_rows, T, H, shape = geometry(x, cos)
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)  # noqa: E731
        forward_kernel[grid](x, cos, sin.contiguous(), x if gain is None else gain.contiguous(), out, n_rows, T, H,
                             x.stride(0), x.stride(1), x.stride(2), RMS_NORM_EPS, HAS_GAIN=gain is not None, **shape)
        return out

    def backward(dy, x, cos, sin, gain):
        x, dy = unit_last(x), unit_last(dy)
        n_rows, T, H, shape = geometry(x, cos)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        row_share = torch.empty(n_rows if gain is not None else 1, device=x.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)  # noqa: E731
        backward_kernel[grid](x, dy, cos, sin.contiguous(), x if gain is None else gain.contiguous(), dx, row_share,
                              n_rows, T, H, x.stride(0), x.stride(1), x.stride(2),
                              dy.stride(0), dy.stride(1), dy.stride(2), RMS_NORM_EPS,
                              HAS_GAIN=gain is not None, **shape)
        dgain = None if gain is None else row_share.view(-1, H).sum(0).to(gain.dtype)
        return dx, dgain

    return forward, backward


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def jit_qk_helpers():
    """Jit the kernels' helpers in place: the kernels call them by module-level name, which Triton resolves to
    jitted functions (once Triton is bound to the module's `triton` and `tl`)."""
    global _qk_rope_columns, _qk_rows
    if not hasattr(_qk_rows, "fn"):  # a JITFunction keeps the plain function as .fn
        _qk_rope_columns, _qk_rows = triton.jit(_qk_rope_columns), triton.jit(_qk_rows)


def triton_qk_norm_rope():
    """Defines (once) torch.ops.pgolf.qk_norm_rope(q [B, T, H, D], k [B, T, Hkv, D], cos, sin [T, half],
    gain [H]) -> (gain * rope(rms_norm(q)), rope(rms_norm(k))), with its backward as a second op: torch.library
    custom ops with fake kernels, so torch.compile keeps them inside the graph. False when Triton does not import."""
    global triton, tl, _TRITON_QK_NORM_ROPE
    if _TRITON_QK_NORM_ROPE is not None:
        return _TRITON_QK_NORM_ROPE
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _TRITON_QK_NORM_ROPE = False
        return False
    jit_qk_helpers()
    configs = [triton.Config({"BLOCK_R": rows}, num_warps=warps) for rows, warps in _QK_CONFIGS]

    def tuned(kernel):
        if triton_interpreting():  # nothing to time: the first config
            return FixedMeta(triton.jit(kernel), BLOCK_R=_QK_CONFIGS[0][0])
        return triton.autotune(configs=configs, key=["n_rows", "D", "HALF"])(triton.jit(kernel))
    forward, backward = qk_norm_rope_launchers(tuned(_qk_norm_rope_forward_kernel),
                                               tuned(_qk_norm_rope_backward_kernel))

    devices = ("cuda", "cpu") if triton_interpreting() else "cuda"

    def on(device):
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    @torch.library.custom_op("pgolf::qk_norm_rope", mutates_args=(), device_types=devices)
    def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with on(q.device):
            return forward(q, cos, sin, gain), forward(k, cos, sin, None)

    @qk_norm_rope.register_fake
    def _(q, k, cos, sin, gain):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    @torch.library.custom_op("pgolf::qk_norm_rope_backward", mutates_args=(), device_types=devices)
    def qk_norm_rope_backward(dq_out: torch.Tensor, dk_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              cos: torch.Tensor, sin: torch.Tensor,
                              gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with on(q.device):
            dq, dgain = backward(dq_out, q, cos, sin, gain)
            dk, _ = backward(dk_out, k, cos, sin, None)
        return dq, dk, dgain

    @qk_norm_rope_backward.register_fake
    def _(dq_out, dk_out, q, k, cos, sin, gain):
        return q.new_empty(q.shape), k.new_empty(k.shape), gain.new_empty(gain.shape)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_rule(ctx, dq_out, dk_out):
        dq, dk, dgain = qk_norm_rope_backward(dq_out, dk_out, *ctx.saved_tensors)
        return dq, dk, None, None, dgain

    qk_norm_rope.register_autograd(backward_rule, setup_context=setup_context)
    _TRITON_QK_NORM_ROPE = qk_norm_rope
    return qk_norm_rope


def pick_qk_kernel(requested: str) -> str:
    """QK_KERNEL -> the path the training step's q/k norm + RoPE runs: triton (asked for, on CUDA or any device
    under TRITON_INTERPRET=1, with Triton) or torch. auto is the faster path as measured: torch, since the
    Triton kernels ran slower than inductor's on the H100 (docs/performance.md, 2026-12-05)."""
    if requested != "triton":
        return "torch"
    why = "no CUDA device" if not (torch.cuda.is_available() or triton_interpreting()) else \
        "" if triton_qk_norm_rope() else "Triton does not import"
    need(not why, f"QK_KERNEL=triton but {why}: set QK_KERNEL=auto or torch")
    return "triton"


# --- attention kernels ------------------------------------------------------------------------------
# A kernel is bound once per forward pass to the batch's token ids: bind(input_ids) returns attend(q, k, v)
# for q [B, T, H, D] and k, v [B, T, Hkv, D]. Causal kernels ignore the ids. With DOC_MASK=1 a position
# attends only to earlier positions of its own document: documents start at BOS tokens (every document in
# the shards starts with one), and the positions before a window's first BOS form one partial document.
# The masked SDPA kernel is the reference (any device, tested against per-document attention); flex
# attention is the fast path on CUDA (compiled, it skips the masked-out blocks).


def document_ids(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, T] int: for each position, how many BOS tokens the window holds up to and including it."""
    return torch.cumsum((input_ids == bos_id).to(torch.int32), dim=1)


def sdpa_heads_first(q, k, v, **kwargs):
    # SDPA wants [B, heads, T, D]; enable_gqa lets the kernel share K/V heads without copying them.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         enable_gqa=q.size(2) != k.size(2), **kwargs)
    return out.transpose(1, 2)


def bind_causal_sdpa(input_ids, bos_id):
    return lambda q, k, v: sdpa_heads_first(q, k, v, is_causal=True)


def bind_masked_sdpa(input_ids, bos_id):
    """The reference document mask: an explicit [B, 1, T, T] boolean mask (memory grows with T^2)."""
    docs = document_ids(input_ids, bos_id)
    T = input_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    mask = (causal & (docs[:, :, None] == docs[:, None, :]))[:, None]
    return lambda q, k, v: sdpa_heads_first(q, k, v, attn_mask=mask)


def bind_flex(input_ids, bos_id):
    """flex attention with a block mask built from this batch's documents (blocks that no query of a
    document can see are skipped, so short documents cost less than causal attention). Forward-only passes
    (evaluation, calibration) take the masked SDPA reference instead: on the H200 with torch 2.11 a compiled
    forward-only flex graph with this mask hit an illegal memory access (2026-12-03), while the training
    graph (forward + backward) ran and matched the reference."""
    if not torch.is_grad_enabled():
        return bind_masked_sdpa(input_ids, bos_id)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    docs = document_ids(input_ids, bos_id)
    B, T = input_ids.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])
    block_mask = create_block_mask(same_document_causal, B, None, T, T, device=input_ids.device)

    def attend(q, k, v):
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                             enable_gqa=q.size(2) != k.size(2))
        return out.transpose(1, 2)
    return attend


def fa3_causal():
    """bind for FlashAttention 3 when flash_attn_interface imports, else None."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None

    def attend_fa3(q, k, v):
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    return lambda input_ids, bos_id: attend_fa3


# --- document-masked training through varlen kernels (DOC_MASK=1 with ATTN_BACKEND=varlen or fa3) ----------
# The training step's micro-batch is on the host before it is copied to the GPU, so its document boundaries
# are found there, at no device sync: cu_seqlens, the offsets in the flattened [B*T] batch where each
# segment starts (every row's first position and every BOS; the same segments document_ids masks), then
# B*T. A varlen kernel attends within each segment only, so the masked-out blocks are never computed. Their
# count changes from batch to batch: cu_seqlens is marked dynamic, so the compiled step has one graph for
# every count. Passes without boundaries (evaluation, calibration, TTT) bind the DOC_MASK kernels above.


def document_cu_seqlens(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """int32 [segments + 1] for input_ids [B, T]: where each document segment of the flattened batch starts,
    then B*T."""
    B, T = input_ids.shape
    opens = input_ids == bos_id
    opens[:, 0] = True
    starts = torch.nonzero(opens.reshape(-1)).reshape(-1)
    return torch.cat((starts, starts.new_tensor([B * T]))).to(torch.int32)


def varlen_reference(q, k, v, cu_seqlens, max_len: int):
    """The varlen kernels' reference, any device: q [N, H, D], k and v [N, Hkv, D] of the flattened batch,
    causal attention inside each segment of cu_seqlens (which may cross rows: the kernels do not see them),
    as one masked SDPA over all N positions. Memory grows with N^2: for tests, not for training."""
    N = q.size(0)
    positions = torch.arange(N, device=q.device)
    segment = torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True)
    mask = (positions[:, None] >= positions[None, :]) & (segment[:, None] == segment[None, :])
    return sdpa_heads_first(q[None], k[None], v[None], attn_mask=mask)[0]


def torch_varlen():
    """PyTorch's varlen kernel (torch.nn.attention.varlen, torch >= 2.10) as fn(q, k, v, cu_seqlens, max_len),
    else None. Causal through window_size=(-1, 0) (older builds: is_causal); K/V heads repeated for GQA where
    this build's kernel takes no enable_gqa."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    takes_gqa = "enable_gqa" in params

    def attend(q, k, v, cu_seqlens, max_len):
        if q.size(1) != k.size(1):
            if takes_gqa:
                return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, enable_gqa=True, **causal)
            repeat = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **causal)
    return attend


def fa3_varlen():
    """FlashAttention 3's varlen kernel (GQA native) as fn(q, k, v, cu_seqlens, max_len), else None."""
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError:
        return None

    def attend(q, k, v, cu_seqlens, max_len):
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)
        return out[0] if isinstance(out, tuple) else out
    return attend


def pick_varlen(requested: str, device: torch.device, doc_mask: bool):
    """(name, fn) of the varlen kernel the training step runs for DOC_MASK=1 and ATTN_BACKEND varlen or fa3 on
    CUDA; (None, None) for every other choice, whose passes all bind pick_attention's kernels."""
    if not doc_mask or requested not in ("varlen", "fa3"):
        return None, None
    need(device.type == "cuda", f"ATTN_BACKEND={requested} with DOC_MASK=1 runs a varlen kernel, which needs a CUDA "
                                "device: set ATTN_BACKEND=auto")
    fn, module = (torch_varlen(), "torch.nn.attention.varlen (torch >= 2.10)") if requested == "varlen" else \
        (fa3_varlen(), "flash_attn_interface (FlashAttention 3)")
    need(fn is not None, f"ATTN_BACKEND={requested} with DOC_MASK=1 but {module} does not import: upgrade torch or "
                         "install FlashAttention 3, or set ATTN_BACKEND=auto")
    return ("varlen-docmask" if requested == "varlen" else "fa3-varlen-docmask"), fn


def bind_varlen(fn, cu_seqlens):
    """attend(q, k, v) over [B, T, heads, D] through a varlen kernel fn and this batch's cu_seqlens."""
    def attend(q, k, v):
        B, T, H, D = q.shape
        out = fn(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu_seqlens, T)
        return out.view(B, T, H, D)
    return attend


def pick_attention(requested: str, device: torch.device, doc_mask: bool = False):
    """(name, bind) for ATTN_BACKEND and DOC_MASK on this device; see the comment above."""
    cuda = device.type == "cuda"
    if doc_mask:  # varlen and fa3 train through pick_varlen's kernel; their other passes bind flex or SDPA here
        if requested in ("flex", "varlen", "fa3") or (requested == "auto" and cuda):
            return "flex-docmask", bind_flex
        return "sdpa-docmask", bind_masked_sdpa
    if requested in ("auto", "fa3") and cuda:
        bind = fa3_causal()
        if bind is not None:
            return "fa3", bind
        need(requested != "fa3", "ATTN_BACKEND=fa3 but flash_attn_interface (FlashAttention 3) is not importable: "
                                 "install it or set ATTN_BACKEND=auto")
    return ("sdpa" if cuda else "sdpa-cpu"), bind_causal_sdpa


def add_delta(t, delta):
    """t plus an eval-time adapter's delta; a target without an adapter (TTT_LORA_TARGETS) gives None."""
    return t if delta is None else t + delta


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, use_xsa: bool,
                 gate_dims: int = 0, qk_kernel: str = "torch"):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), float(qk_gain_init)))
        self.use_xsa = use_xsa
        # ATTN_GATE_DIMS (the sparse attention output gate of PR #1787): each head's output is scaled by
        # sigmoid(w_h . x[:gate_dims]) of the block's normed input; zero-initialised, so every gate starts at 0.5
        self.out_gate = nn.Parameter(torch.zeros(num_heads, gate_dims)) if gate_dims else None
        self.qk_kernel = qk_kernel  # pick_qk_kernel's choice: how a CUDA training step runs the q/k norm + RoPE

    def forward(self, x, ctx: "LayerContext"):
        B, T, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if ctx.adapter is not None:
            dq, dk, dv, d_out = ctx.adapter.attn(x)
            q, k, v = add_delta(q, dq), add_delta(k, dk), add_delta(v, dv)
        if ctx.value is not None:  # value embedding of this layer (VALUE_EMBED_LAYERS)
            v = v + ctx.value
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = ctx.rope
        if self.qk_kernel == "triton" and ctx.adapter is None and self.training and torch.is_grad_enabled():
            q, k = torch.ops.pgolf.qk_norm_rope(q, k, cos, sin, self.q_gain.to(q.dtype))
        else:
            q = apply_partial_rope(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[:, None]
            k = apply_partial_rope(rms_norm(k), cos, sin)
        y = ctx.attend(q, k, v)
        if self.use_xsa:
            y = exclusive_self_attention(y, v)
        if self.out_gate is not None:
            gate = torch.sigmoid(F.linear(x[..., :self.out_gate.size(1)], self.out_gate.to(x.dtype)))
            y = y * gate[..., None]
        out = self.proj(y.reshape(B, T, -1))
        if ctx.adapter is not None:
            out = add_delta(out, d_out)
        return out


# --- the MLP and its fused kernels ----------------------------------------------------------------
# MLP_KERNEL picks, once when the model is built, how the MLP's training forward and backward run on CUDA:
#   torch    the plain module: the reference, and the only path on CPU, in evaluation and in TTT (the GPTQ
#            Hessian hooks on fc/proj see its calls)
#   triton   FusedMLPFunction: one Triton kernel writes pre = x W_up^T and post = LeakyReLU_0.5(pre)^2, both
#            bf16 from the fp32 accumulator, then cuBLAS post W_down^T; the backward is plain matmuls
#   cutlass  triton's forward; the backward's dpre = (g W_down) * phi'(pre) is one CUTLASS GEMM with phi'
#            applied in its epilogue (the optional cutlass_evt_fusion/ extension, built with
#            pip install --no-build-isolation ./cutlass_evt_fusion)
#   fp8      FP8MLPFunction: all four GEMMs (two forward, dX and dW of each backward) through torch._scaled_mm,
#            which runs at about twice the bf16 rate on H100/H200 tensor cores (issue 11, optional 6)
# The forward keeps pre rather than phi'(pre): as many bytes, and phi' = 2u or 0.5u is a power-of-two scaling,
# so phi' of the bf16 pre is exactly the bf16 rounding of phi' of the fp32 pre.

_TRITON_UP_ACT = None  # the op once defined; False when Triton does not import
_MLP_KERNEL_CHOICES = {}  # MLP_KERNEL value -> the path it resolved to in this process
_CUTLASS_TILE = None  # (M, N, K) tile of the cutlass_evt_fusion kernel once it has loaded
# autotuned (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_K 64: each compiles for sm_90 to wgmma without spills
# (128 x 256 with 8 warps is left out: ptxas serializes its wgmma)
_MLP_UP_ACT_CONFIGS = ((128, 128, 8, 4), (128, 128, 8, 3), (128, 128, 4, 4), (64, 256, 4, 4))


def _mlp_up_act_kernel(x_ptr, w_ptr, pre_ptr, post_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """pre = x @ w^T (x [M, K], w [N, K], both K-contiguous) and post = LeakyReLU_0.5(pre)^2, from fp32."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # GROUP_M consecutive programs walk down a column of output tiles, so the W tile they share stays in L2
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past M or N read a valid row instead (their results are never stored): no load masks but K's
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + (offs_n % N)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of w^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    leaky = tl.where(acc > 0, acc, 0.5 * acc)
    out = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(pre_ptr + out, acc.to(tl.bfloat16), mask=inside)
    tl.store(post_ptr + out, (leaky * leaky).to(tl.bfloat16), mask=inside)


def triton_mlp_up_act():
    """Defines (once) the op torch.ops.pgolf.mlp_up_act(x [M, K], w_up [N, K]) -> (pre, post), both [M, N]
    bf16: a torch.library custom op with a fake kernel, so torch.compile keeps it inside one graph.
    Returns False when Triton does not import."""
    global triton, tl, _TRITON_UP_ACT
    if _TRITON_UP_ACT is not None:
        return _TRITON_UP_ACT
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _TRITON_UP_ACT = False
        return False
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=w, num_stages=st)
               for bm, bn, w, st in _MLP_UP_ACT_CONFIGS]
    kernel = triton.autotune(configs=configs, key=["M", "N", "K"])(triton.jit(_mlp_up_act_kernel))

    @torch.library.custom_op("pgolf::mlp_up_act", mutates_args=(), device_types="cuda")
    def mlp_up_act(x: torch.Tensor, w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch._check(x.dtype == torch.bfloat16 and w_up.dtype == torch.bfloat16, lambda: "mlp_up_act takes bf16")
        x, w_up = x.contiguous(), w_up.contiguous()
        (M, K), N = x.shape, w_up.size(0)
        pre = torch.empty((M, N), device=x.device, dtype=torch.bfloat16)
        post = torch.empty_like(pre)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        with torch.cuda.device(x.device):
            kernel[grid](x, w_up, pre, post, M, N, K, x.stride(0), w_up.stride(0), pre.stride(0))
        return pre, post

    @mlp_up_act.register_fake
    def _(x, w_up):
        return x.new_empty((x.size(0), w_up.size(0))), x.new_empty((x.size(0), w_up.size(0)))

    _TRITON_UP_ACT = mlp_up_act
    return mlp_up_act


def pick_mlp_kernel(requested: str) -> str:
    """MLP_KERNEL -> the path that runs: cutlass, triton, fp8 or torch (auto = the fastest that loads on CUDA)."""
    global _CUTLASS_TILE
    if requested in _MLP_KERNEL_CHOICES:
        return _MLP_KERNEL_CHOICES[requested]
    if requested == "fp8":  # needs neither Triton nor the extension: decided before probing them
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        if capability is None or capability < (8, 9):
            raise UserError(f"MLP_KERNEL=fp8 needs FP8 tensor cores (an SM 8.9+ GPU such as the H100/H200), "
                            f"{'but there is no CUDA device' if capability is None else f'not SM {capability}'}: "
                            f"set MLP_KERNEL=torch")
        _MLP_KERNEL_CHOICES[requested] = "fp8"
        return "fp8"
    why = "no CUDA device" if not torch.cuda.is_available() else ""
    if not why and not triton_mlp_up_act():
        why = "Triton does not import"
    cutlass_why = why
    if not why:
        try:
            import cutlass_evt_fusion
            cutlass_why = cutlass_evt_fusion.unavailable_reason()
            if not cutlass_why:
                _CUTLASS_TILE = (cutlass_evt_fusion.TILE_M, cutlass_evt_fusion.TILE_N, cutlass_evt_fusion.TILE_K)
        except Exception as e:  # an optional extension that fails to load must leave the other paths running
            cutlass_why = f"cutlass_evt_fusion does not import ({type(e).__name__}: {e})"
    if requested == "cutlass" and cutlass_why:
        raise UserError(f"MLP_KERNEL=cutlass but {cutlass_why}: build the extension (pip install --no-build-isolation "
                        f"./cutlass_evt_fusion) on an H100/H200 with Triton, or set MLP_KERNEL=auto")
    if requested == "triton" and why:
        raise UserError(f"MLP_KERNEL=triton but {why}: set MLP_KERNEL=auto or torch")
    choice = requested if requested != "auto" else "cutlass" if not cutlass_why else "triton" if not why else "torch"
    _MLP_KERNEL_CHOICES[requested] = choice
    return choice


class FusedMLPFunction(torch.autograd.Function):
    """LeakyReLU_0.5(x W_up^T)^2 W_down^T for x [M, dim] with the activation fused into the up projection
    (kernel triton/cutlass) and phi' into the dpre GEMM (cutlass, for shapes its tile divides). kernel
    'torch' is the same dataflow in plain PyTorch, which the CPU tests hold against the plain MLP."""

    @staticmethod
    def forward(ctx, x, w_up, w_down, kernel: str):
        if kernel == "torch":
            pre = F.linear(x, w_up)
            post = F.leaky_relu(pre, 0.5).square()
        else:
            pre, post = torch.ops.pgolf.mlp_up_act(x, w_up)
        tile = _CUTLASS_TILE
        ctx.cutlass = (kernel == "cutlass" and tile is not None and x.size(0) % tile[0] == 0
                       and w_up.size(0) % tile[1] == 0 and x.size(1) % tile[2] == 0)
        ctx.save_for_backward(x, w_up, w_down, pre, post)
        return F.linear(post, w_down)

    @staticmethod
    def backward(ctx, grad):
        x, w_up, w_down, pre, post = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.cutlass:
            d_pre = torch.ops.cutlass_evt_fusion.mlp_down_backward(grad, w_down, pre)
        else:
            d_pre = (grad @ w_down) * torch.where(pre > 0, 2.0 * pre, 0.5 * pre)
        return d_pre @ w_up, d_pre.t() @ x, grad.t() @ post, None


# FP8 (issue 11, optional): values and weights in e4m3 (3 mantissa bits, max 448), gradients in e5m2 (2 bits,
# max 57344: the wider range they need). Each tensor gets one fp32 scale per call, amax / format max, computed on
# the device (no host sync) and handed to _scaled_mm, which multiplies it back in. _scaled_mm wants its first
# operand row-major and its second column-major, and never two e5m2 operands.
FP8_VALUES, FP8_VALUES_MAX = torch.float8_e4m3fn, 448.0
FP8_GRADS, FP8_GRADS_MAX = torch.float8_e5m2, 57344.0


def to_fp8(t: torch.Tensor, dtype, max_value: float) -> tuple:
    """(t scaled into the format's range and rounded to it, the fp32 scale that undoes the scaling)."""
    scale = (t.detach().abs().amax().float() / max_value).clamp_min(1e-30)
    # clamped: e4m3fn has no infinity, an out-of-range value would round to NaN (only a tiny amax can do it)
    return (t.float() / scale).clamp(-max_value, max_value).to(dtype), scale


def fp8_mm(a: tuple, b_t: tuple) -> torch.Tensor:
    """a [M, K] @ b_t [K, N] in bf16 from fp8 operands (tensor, scale); b_t made column-major as required."""
    (a8, a_scale), (b8, b_scale) = a, b_t
    if b8.stride(0) != 1:  # column-major: the transpose of a contiguous [N, K]
        b8 = b8.t().contiguous().t()
    return torch._scaled_mm(a8.contiguous(), b8, scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16)


def fp8_t(pair: tuple) -> tuple:
    return pair[0].t(), pair[1]


class FP8MLPFunction(torch.autograd.Function):
    """LeakyReLU_0.5(x W_up^T)^2 W_down^T for x [M, dim] with every GEMM in FP8: the forward's two on e4m3
    values, the backward's four on an e5m2 gradient times an e4m3 value. pre stays bf16 for phi'. The plain
    MLP is the reference (tests/test_mlp_kernels.py: the same result as the dequantized operands give, and
    within FP8's error of bf16)."""

    @staticmethod
    def forward(ctx, x, w_up, w_down):
        x8, w_up8, w_down8 = (to_fp8(t, FP8_VALUES, FP8_VALUES_MAX) for t in (x, w_up, w_down))
        pre = fp8_mm(x8, fp8_t(w_up8))                       # [M, hidden]
        post8 = to_fp8(F.leaky_relu(pre, 0.5).square(), FP8_VALUES, FP8_VALUES_MAX)
        ctx.save_for_backward(x8[0], x8[1], w_up8[0], w_up8[1], w_down8[0], w_down8[1], pre, post8[0], post8[1])
        return fp8_mm(post8, fp8_t(w_down8))                 # [M, dim]

    @staticmethod
    def backward(ctx, grad):
        x8, x_s, w_up8, w_up_s, w_down8, w_down_s, pre, post8, post_s = ctx.saved_tensors
        g8 = to_fp8(grad, FP8_GRADS, FP8_GRADS_MAX)
        d_pre = fp8_mm(g8, (w_down8, w_down_s)) * torch.where(pre > 0, 2.0 * pre, 0.5 * pre)
        d_pre8 = to_fp8(d_pre, FP8_GRADS, FP8_GRADS_MAX)
        d_x = fp8_mm(d_pre8, (w_up8, w_up_s))                # [M, hidden] @ [hidden, dim]
        d_w_up = fp8_mm(fp8_t(d_pre8), (x8, x_s))            # [hidden, M] @ [M, dim]
        d_w_down = fp8_mm(fp8_t(g8), (post8, post_s))        # [dim, M] @ [M, hidden]
        return d_x, d_w_up, d_w_down


def mlp_hidden(s) -> int:
    return int(s.mlp_mult * s.model_dim)


class MLP(nn.Module):
    """W_down (LeakyReLU_0.5(W_up x))^2; kernel (pick_mlp_kernel) says how a CUDA training step runs it."""

    def __init__(self, dim: int, hidden: int, kernel: str = "torch"):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)
        self.kernel = kernel

    def forward(self, x, adapter=None):
        if (self.kernel != "torch" and adapter is None and self.training and torch.is_grad_enabled()
                and x.is_cuda and x.dtype == torch.bfloat16):
            shape, w_up, w_down = x.shape, self.fc.weight.to(x.dtype), self.proj.weight.to(x.dtype)
            if self.kernel == "fp8":
                out = FP8MLPFunction.apply(x.reshape(-1, shape[-1]), w_up, w_down)
            else:
                out = FusedMLPFunction.apply(x.reshape(-1, shape[-1]), w_up, w_down, self.kernel)
            out = out.view(*shape[:-1], -1)
        else:
            out = self.proj(F.leaky_relu(self.fc(x), 0.5).square())
        if adapter is not None:
            out = add_delta(out, adapter.mlp(x))
        return out


# --- the training loss and its fused kernel ----------------------------------------------------------
# LOSS_KERNEL=triton computes the training step's mean cross-entropy of the softcapped logits c*tanh(z/c)
# straight from the bf16 head output z: one pass over each row for its log-sum-exp (online, in fp32), and
# in the backward one pass that writes dz = g * (softmax - onehot) * (1 - tanh^2). The plain path (torch)
# is the reference: inductor's version reads and writes the 98,304 x 8,192 logits more often. auto (the
# default) takes triton on CUDA; evaluation and TTT always use the plain per-token losses.

_TRITON_SOFTCAP_CE = None  # the op once defined; False when Triton does not import


def _softcap(z, cap):
    t = 1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0)  # tanh(z / cap), saturating cleanly at +-1
    return cap * t, t


def _softcap_ce_forward_kernel(z_ptr, target_ptr, loss_ptr, lse_ptr, V, stride, cap, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    running_max = tl.full([BLOCK_V], -1e30, tl.float32)  # finite: capped logits are >= -cap
    running_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        y, _ = _softcap(tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32), cap)
        y = tl.where(cols < V, y, float("-inf"))
        new_max = tl.maximum(running_max, y)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(y - new_max)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
    target_logit, _ = _softcap(tl.load(base + tl.load(target_ptr + row)).to(tl.float32), cap)
    tl.store(loss_ptr + row, lse - target_logit)
    tl.store(lse_ptr + row, lse)


def _softcap_ce_backward_kernel(z_ptr, target_ptr, lse_ptr, dloss_ptr, dz_ptr, V, stride, cap,
                                BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse, g, target = tl.load(lse_ptr + row), tl.load(dloss_ptr + row), tl.load(target_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        y, t = _softcap(tl.load(z_ptr + row * stride + cols, mask=cols < V, other=0.0).to(tl.float32), cap)
        dy = tl.exp(y - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(dz_ptr + row * stride + cols, (g * dy * (1.0 - t * t)).to(dz_ptr.dtype.element_ty), mask=cols < V)


def triton_softcap_ce():
    """Defines (once) torch.ops.pgolf.softcap_ce(z [N, V], target [N], cap) -> (loss [N], lse [N]) fp32, with
    its backward as a second op, both torch.library custom ops with fake kernels (no graph break under
    torch.compile). Returns False when Triton does not import."""
    global triton, tl, _TRITON_SOFTCAP_CE
    if _TRITON_SOFTCAP_CE is not None:
        return _TRITON_SOFTCAP_CE
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _TRITON_SOFTCAP_CE = False
        return False
    global _softcap  # the kernels call it by its module-level name, which Triton resolves when it compiles them
    _softcap = triton.jit(_softcap)
    forward_kernel = triton.jit(_softcap_ce_forward_kernel)
    backward_kernel = triton.jit(_softcap_ce_backward_kernel)
    block = 1024

    @torch.library.custom_op("pgolf::softcap_ce", mutates_args=(), device_types="cuda")
    def softcap_ce(z: torch.Tensor, target: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
        z, target = z.contiguous(), target.contiguous()
        loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        with torch.cuda.device(z.device):
            forward_kernel[(z.size(0),)](z, target, loss, lse, z.size(1), z.stride(0), cap, BLOCK_V=block,
                                         num_warps=8)
        return loss, lse

    @softcap_ce.register_fake
    def _(z, target, cap):
        return z.new_empty(z.size(0), dtype=torch.float32), z.new_empty(z.size(0), dtype=torch.float32)

    @torch.library.custom_op("pgolf::softcap_ce_backward", mutates_args=(), device_types="cuda")
    def softcap_ce_backward(z: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, dloss: torch.Tensor,
                            cap: float) -> torch.Tensor:
        z = z.contiguous()
        dz = torch.empty_like(z)
        with torch.cuda.device(z.device):
            backward_kernel[(z.size(0),)](z, target.contiguous(), lse.contiguous(), dloss.contiguous().float(), dz,
                                          z.size(1), z.stride(0), cap, BLOCK_V=block, num_warps=8)
        return dz

    @softcap_ce_backward.register_fake
    def _(z, target, lse, dloss, cap):
        return torch.empty_like(z)

    def setup_context(ctx, inputs, output):
        z, target, cap = inputs
        ctx.save_for_backward(z, target, output[1])
        ctx.cap = cap

    def backward(ctx, dloss, dlse):
        z, target, lse = ctx.saved_tensors
        return softcap_ce_backward(z, target, lse, dloss, ctx.cap), None, None

    softcap_ce.register_autograd(backward, setup_context=setup_context)
    _TRITON_SOFTCAP_CE = softcap_ce
    return softcap_ce


def pick_loss_kernel(requested: str) -> str:
    """LOSS_KERNEL -> the path the training loss runs: triton (CUDA with Triton) or torch."""
    why = "no CUDA device" if not torch.cuda.is_available() else "" if triton_softcap_ce() else "Triton does not import"
    need(requested != "triton" or not why, f"LOSS_KERNEL=triton but {why}: set LOSS_KERNEL=auto or torch")
    return "torch" if why or requested == "torch" else "triton"


# --- the n-gram tilt of a scored distribution (NGRAM_TILT, PR #1514/#2135) --------------------------
# The one place the tilt is applied: GPT.token_losses calls it for every pass that passes hints. The
# hints themselves (which token, if any, each target's n-gram context predicts) come from ngram_hints
# in the EVALUATION section and never from the target.


def ngram_tilt(z: torch.Tensor, hints: torch.Tensor, beta: float) -> torch.Tensor:
    """Tilted logits: z [..., V] plus beta on each position's hinted token (hints [...], -1 = no hint).
    Softmax (the cross-entropy's log-softmax) of the result is the full-vocabulary distribution
    p'(a) = p(a) exp(beta [a = hint]) / (1 + p(hint) (e^beta - 1)): properly normalised by construction."""
    bonus = torch.where(hints >= 0, beta, 0.0).to(z.dtype)
    return z.scatter_add(-1, hints.clamp_min(0).long().unsqueeze(-1), bonus.unsqueeze(-1))


class LayerContext(NamedTuple):
    """What every block of one forward pass reads besides the residual stream: the RoPE tables, the
    attention kernel, this virtual layer's eval-time adapters (None outside LoRA TTT), the MLP of this
    visit when the recurrent passes have their own (None: the block's) and the value embedding added to
    this layer's attention values (None: none)."""
    rope: tuple
    attend: object
    adapter: object = None
    mlp: object = None
    value: object = None


class Block(nn.Module):
    def __init__(self, layer: int, s: Settings):
        super().__init__()
        dim = s.model_dim
        self.attn = self.attn_scale = None  # ATTN_OFF_LAYERS: the block is its MLP alone
        if layer not in layer_list(s.attn_off_layers, "ATTN_OFF_LAYERS", s.num_layers):
            self.attn = Attention(dim, s.num_heads, s.num_kv_heads, s.qk_gain_init,
                                  layer >= s.num_layers - s.xsa_last_n, s.attn_gate_dims, pick_qk_kernel(s.qk_kernel))
            self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp = MLP(dim, mlp_hidden(s), pick_mlp_kernel(s.mlp_kernel))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # mix of (x, x0)
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if s.ln_scale else 1.0

    def mix(self, x, x0):
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def attn_branch(self, x_in, ctx: LayerContext):
        if self.attn is None:  # a 0-d zero: every residual form adds it as it would the attention output
            return x_in.new_zeros(())
        return self.attn_scale.to(x_in.dtype) * self.attn(rms_norm(x_in) * self.norm_scale, ctx)

    def mlp_branch(self, h, ctx: LayerContext):
        mlp = self.mlp if ctx.mlp is None else ctx.mlp
        return self.mlp_scale.to(h.dtype) * mlp(rms_norm(h) * self.norm_scale, ctx.adapter)

    def forward(self, x, x0, ctx: LayerContext):
        """The standard (single-stream) block."""
        x_in = self.mix(x, x0)
        x_mid = x_in + self.attn_branch(x_in, ctx)
        return x_mid + self.mlp_branch(x_mid, ctx)


def virtual_layers(num_layers: int, num_loops: int, loop_start: int, loop_end: int, looping: bool) -> tuple:
    """Physical block index at each virtual position: the recurrent segment repeats NUM_LOOPS extra times."""
    if not looping or num_loops == 0:
        return tuple(range(num_layers))
    segment = list(range(loop_start, loop_end + 1))
    return tuple(list(range(loop_start)) + segment * (num_loops + 1) + list(range(loop_end + 1, num_layers)))


# --- residual forms: how a block reads and writes the residual stream ------------------------------------
# The residual stream is a tuple of lanes: one lane before PARALLEL_RESIDUAL_START, two from there on.
# A form says how a block updates the lanes, where a U-Net skip goes, how the two lanes start from one
# and how they merge at the end; its learned scalars are registered on the GPT under the names the
# artifact has always used. GPT picks one form at construction, so the trunk has no mode branches. A new
# variant is a new subclass and one entry in RESIDUAL_FORMS.


class OneLane:
    """The plain residual stream (and every block before the two-lane tail)."""
    mode = "off"

    def add_parameters(self, model: "GPT", s: Settings):
        pass

    def enter(self, lanes: tuple) -> tuple:
        return lanes

    def block(self, model: "GPT", i: int, lanes: tuple, x0, ctx: LayerContext) -> tuple:
        return (model.blocks[i](lanes[0], x0, ctx),)

    def skip(self, model: "GPT", lanes: tuple, skip, j: int) -> tuple:
        return (model.apply_skip(lanes[0], skip, j),)

    def merge(self, model: "GPT", lanes: tuple):
        return lanes[0]

    def report(self, model: "GPT", positions: list, schedule: tuple) -> list:
        return []


class TwoLanes(OneLane):
    """Shared by the two-lane forms: both lanes start as the stream; later skips feed the attention lane."""

    def enter(self, lanes: tuple) -> tuple:
        return lanes if len(lanes) == 2 else (lanes[0], lanes[0])

    def skip(self, model: "GPT", lanes: tuple, skip, j: int) -> tuple:
        return model.apply_skip(lanes[0], skip, j), lanes[1]

    def merge(self, model: "GPT", lanes: tuple):
        return 0.5 * (lanes[0] + lanes[1])


class LambdaLanes(TwoLanes):
    """Learned per-layer lane decays R[i, lane] and branch writes P[i, branch, lane] (branch 0 = attention, 1 = MLP)."""
    resid_init = 1.1

    def add_parameters(self, model: "GPT", s: Settings):
        model.parallel_resid_lambdas = nn.Parameter(torch.full((s.num_layers, 2), self.resid_init))
        model.parallel_post_lambdas = nn.Parameter(torch.ones(s.num_layers, 2, 2))

    def lambdas(self, model: "GPT", i: int, dtype) -> tuple:
        return model.parallel_resid_lambdas[i].to(dtype), model.parallel_post_lambdas[i].to(dtype)

    def report(self, model: "GPT", positions: list, schedule: tuple) -> list:
        R, P = model.parallel_resid_lambdas.detach().float().cpu(), model.parallel_post_lambdas.detach().float().cpu()
        lines = [f"parallel_residual:converged mode:{self.mode} used_layers:{len(positions)}"]
        for pos in positions:
            i = schedule[pos]
            lines.append(f"parallel_residual layer:{pos} physical:{i} attn_resid:{R[i, 0]:.4f} "
                         f"attn_to_attn:{P[i, 0, 0]:.4f} attn_to_mlp:{P[i, 0, 1]:.4f} mlp_resid:{R[i, 1]:.4f} "
                         f"mlp_to_attn:{P[i, 1, 0]:.4f} mlp_to_mlp:{P[i, 1, 1]:.4f}")
        return lines


class FullParallel(LambdaLanes):
    """PR #1529: attention reads lane 0, the MLP reads lane 1, both before the block; each writes both lanes."""
    mode = "full"

    def block(self, model: "GPT", i: int, lanes: tuple, x0, ctx: LayerContext) -> tuple:
        block, (lane0, lane1) = model.blocks[i], lanes
        R, P = self.lambdas(model, i, lane0.dtype)
        a = block.attn_branch(block.mix(lane0, x0), ctx)
        m = block.mlp_branch(lane1, ctx)
        return R[0] * lane0 + P[0, 0] * a + P[1, 0] * m, R[1] * lane1 + P[0, 1] * a + P[1, 1] * m


class SequentialLanes(LambdaLanes):
    """PR #1204: the MLP reads lane 1 after the attention write, mixed with x0; skips feed both lanes."""
    mode = "sequential"
    resid_init = math.sqrt(1.1)

    def block(self, model: "GPT", i: int, lanes: tuple, x0, ctx: LayerContext) -> tuple:
        block, (lane0, lane1) = model.blocks[i], lanes
        R, P = self.lambdas(model, i, lane0.dtype)
        a = block.attn_branch(block.mix(lane0, x0), ctx)
        lane0, lane1 = R[0] * lane0 + P[0, 0] * a, R[0] * lane1 + P[0, 1] * a
        m = block.mlp_branch(block.mix(lane1, x0), ctx)
        return R[1] * lane0 + P[1, 0] * m, R[1] * lane1 + P[1, 1] * m

    def skip(self, model: "GPT", lanes: tuple, skip, j: int) -> tuple:
        return model.apply_skip(lanes[0], skip, j), model.apply_skip(lanes[1], skip, j)


class SplitLanes(TwoLanes):
    """PR #1477: an attention-only lane and an MLP-only lane, merged at the end by a learned lerp."""
    mode = "split"

    def add_parameters(self, model: "GPT", s: Settings):
        model.lane_merge = nn.Parameter(torch.tensor(0.5))

    def block(self, model: "GPT", i: int, lanes: tuple, x0, ctx: LayerContext) -> tuple:
        block, (lane0, lane1) = model.blocks[i], lanes
        x_in = block.mix(lane0, x0)
        return x_in + block.attn_branch(x_in, ctx), lane1 + block.mlp_branch(lane1, ctx)

    def merge(self, model: "GPT", lanes: tuple):
        lam = model.lane_merge.to(lanes[0].dtype)
        return lam * lanes[0] + (1 - lam) * lanes[1]

    def report(self, model: "GPT", positions: list, schedule: tuple) -> list:
        return [f"parallel_residual:converged mode:split lane_merge:{model.lane_merge.item():.4f}"]


RESIDUAL_FORMS = {form.mode: form for form in (FullParallel(), SplitLanes(), SequentialLanes(), OneLane())}
ONE_LANE = RESIDUAL_FORMS["off"]


# --- input-side components of PR #1204 (each a setting, off by default) ----------------------------------
# BigramHash, SmearGate and the value embeddings act in GPT.forward_hidden, so training, evaluation and
# both TTT modes see them alike.

class HashEmbedding(nn.Module):
    """A table over hashed (previous, current) token pairs, bucket (prev * 2039 + cur) mod buckets;
    position 0 of a window hashes with prev = 0. Zero-initialised: it adds nothing until trained. Used
    twice: as TTT's eval-time hash embedding (HASH_EMBED_ENABLED, PR #1460 idea) and as the table of
    BigramHash."""

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(buckets, dim))

    def forward(self, input_ids):
        prev = F.pad(input_ids[:, :-1], (1, 0))
        return F.embedding((prev * 2039 + input_ids) % self.weight.size(0), self.weight)


class BigramHash(nn.Module):
    """PR #1204's BigramHash, trained with the model: a narrow hash table (zero) projected to the model
    width (orthogonal, so the table gets gradients from the first step) and a learned scale (0.05),
    added to the token embedding before its norm."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.table = HashEmbedding(buckets, dim)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, input_ids):
        return self.proj(self.table(input_ids)) * self.scale


class SmearGate(nn.Module):
    """One-token look-back: x_t <- x_t + sigmoid(gate) * (x_{t-1} - x_t), a learned gate per channel
    (zero: half the previous position at the start, as in PR #1204). Masked where there is nothing of
    this document to look back at: position 0 of a window and every BOS, so no information crosses from
    one document into the next (the frontier's BOS fix, PR #1851)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x, input_ids, bos_id: int):
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        looks_back = F.pad(input_ids[:, 1:] != bos_id, (1, 0), value=False).unsqueeze(-1)
        g = torch.sigmoid(self.gate.to(x.dtype)) * looks_back.to(x.dtype)
        return x + g * (prev - x)


class ValueEmbedding(nn.Module):
    """PR #1204's value embeddings: one table VOCAB_SIZE x VALUE_EMBED_DIM (normal, std 0.01) projected
    to the key/value width (orthogonal) and scaled (0.1), added to the attention values of each layer of
    VALUE_EMBED_LAYERS times that layer's own learned scale (1): token identity re-enters deep layers."""

    def __init__(self, s: Settings):
        super().__init__()
        self.layers = layer_list(s.value_embed_layers, "VALUE_EMBED_LAYERS", s.num_layers)
        self.table = nn.Embedding(s.vocab_size, s.value_embed_dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.proj = CastedLinear(s.value_embed_dim, s.num_kv_heads * (s.model_dim // s.num_heads))
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.layer_scales = nn.Parameter(torch.ones(len(self.layers)))

    def per_layer(self, input_ids, dtype) -> dict:
        """{physical layer: the value embedding its attention adds}, computed once per forward."""
        shared = self.proj(self.table(input_ids).to(dtype)) * self.scale.to(dtype)
        return {layer: shared * self.layer_scales[k].to(dtype) for k, layer in enumerate(self.layers)}


class GPT(nn.Module):
    def __init__(self, s: Settings):
        super().__init__()
        self.settings = s
        self.vocab_size, self.dim = s.vocab_size, s.model_dim
        self.tok_emb = nn.Embedding(s.vocab_size, s.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=s.tied_embed_init_std)
        self.bigram = BigramHash(s.bigram_hash_buckets, s.bigram_hash_dim, s.model_dim) \
            if s.bigram_hash_buckets else None
        self.smear = SmearGate(s.model_dim) if s.smear_gate else None
        self.value_embed = ValueEmbedding(s) if s.value_embed_layers.strip() else None
        self.blocks = nn.ModuleList(Block(i, s) for i in range(s.num_layers))
        # UNTIE_LOOP_MLP: extra pass k (1..NUM_LOOPS) over segment layer i uses loop_mlps[(k-1)*len + i-LOOP_START]
        segment = s.loop_end - s.loop_start + 1
        self.loop_mlps = nn.ModuleList(MLP(s.model_dim, mlp_hidden(s), self.blocks[0].mlp.kernel)
                                       for _ in range(s.num_loops * segment)) if s.untie_loop_mlp else None
        self.mlp_kernel = self.blocks[0].mlp.kernel  # MLP_KERNEL as resolved: cutlass, triton, fp8 or torch
        self.loss_kernel = pick_loss_kernel(s.loss_kernel)  # LOSS_KERNEL as resolved: triton or torch
        self.qk_kernel = pick_qk_kernel(s.qk_kernel)  # QK_KERNEL as resolved: triton or torch
        self.residual = RESIDUAL_FORMS[s.parallel_residual_mode]
        self.looping = False  # switched on at ENABLE_LOOPING_AT; torch.compile keeps one graph per value
        schedules = [virtual_layers(s.num_layers, s.num_loops, s.loop_start, s.loop_end, on) for on in (False, True)]
        num_skips = max(min(len(v) // 2, len(v) - len(v) // 2) for v in schedules)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, s.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, s.model_dim)) if s.skip_gates_enabled else None
        self.residual.add_parameters(self, s)
        for schedule in schedules:
            self._check_parallel_region(schedule)
        self.use_attention("sdpa", torch.device("cpu"))

    def embedding_tables(self) -> list:
        """Token-indexed tables: trained by AdamW at TIED_EMBED_LR, like the tied embedding."""
        tables = [self.tok_emb.weight]
        if self.bigram is not None:
            tables.append(self.bigram.table.weight)
        if self.value_embed is not None:
            tables.append(self.value_embed.table.weight)
        return tables

    def start_looping(self):
        """Switch depth recurrence on in training. Untied extra passes start as copies of the first pass's
        MLPs (PR #1204), so switching on does not throw the trained MLPs away."""
        self.looping = True
        if self.loop_mlps is not None:
            s, segment = self.settings, self.settings.loop_end - self.settings.loop_start + 1
            with torch.no_grad():
                for k, mlp in enumerate(self.loop_mlps):
                    mlp.load_state_dict(self.blocks[s.loop_start + k % segment].mlp.state_dict())

    def visit_mlps(self, schedule) -> list:
        """The MLP each virtual position runs: None (the block's own) except on extra recurrent passes
        with UNTIE_LOOP_MLP."""
        s, out, seen = self.settings, [], {}
        for i in schedule:
            visit = seen.get(i, 0)
            seen[i] = visit + 1
            untied = self.loop_mlps is not None and visit > 0
            out.append(self.loop_mlps[(visit - 1) * (s.loop_end - s.loop_start + 1) + i - s.loop_start]
                       if untied else None)
        return out

    def use_attention(self, requested: str, device: torch.device, bos_id: int = 1) -> str:
        """Pick the attention kernels (pick_attention) for this device; bos_id: the tokenizer's BOS, where
        documents start (1 in the challenge's tokenizers)."""
        self.bos_id = bos_id
        varlen_name, self.varlen_attention = pick_varlen(requested, device, self.settings.doc_mask)
        self.attention_backend, self.bind_attention = pick_attention(requested, device, self.settings.doc_mask)
        if varlen_name:  # the training step's kernel first, then the one of the passes without boundaries
            self.attention_backend = f"{varlen_name} other_passes:{self.attention_backend}"
        # rows that each hold a single document need no mask: causal attention scores them the same
        self.bind_one_document = pick_attention("sdpa" if requested in ("flex", "varlen") else requested, device)[1]
        return self.attention_backend

    # --- structure -------------------------------------------------------------------------------

    def schedule(self) -> tuple:
        s = self.settings
        return virtual_layers(s.num_layers, s.num_loops, s.loop_start, s.loop_end, self.looping)

    def parallel_positions(self, schedule) -> list:
        if self.residual is ONE_LANE:
            return []
        return [p for p, i in enumerate(schedule) if i >= self.settings.parallel_residual_start]

    def forms(self, schedule) -> list:
        """The residual form of each virtual position: the chosen one in the two-lane tail, one lane before."""
        parallel = set(self.parallel_positions(schedule))
        return [self.residual if pos in parallel else ONE_LANE for pos in range(len(schedule))]

    def _check_parallel_region(self, schedule):
        active = self.parallel_positions(schedule)
        if active and (active != list(range(active[0], len(schedule))) or active[0] < len(schedule) // 2):
            raise UserError(f"PARALLEL_RESIDUAL_START={self.settings.parallel_residual_start} puts two-lane blocks "
                            f"outside the tail of the decoder (schedule {list(schedule)}): use a layer after LOOP_END "
                            f"and in the decoder half")

    # --- forward ---------------------------------------------------------------------------------

    def apply_skip(self, x, skip, j):
        scaled = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        gate = torch.sigmoid(self.skip_gates[j]).to(x.dtype)
        return torch.lerp(scaled, x, gate)  # gate * x + (1 - gate) * scaled

    def forward_hidden(self, input_ids, lora=None, extra_embedding=None, one_document_per_row: bool = False,
                       cu_seqlens=None, rope=None):
        """Final-normed hidden states [B, T, dim] for input_ids [B, T]: the one forward of training,
        evaluation and both TTT modes. The first half of the virtual layers (the encoder) pushes U-Net
        skips that the second half pops; the residual form of each position moves the lanes.
        one_document_per_row: each row holds one document (LoRA TTT), so plain causal attention is used.
        cu_seqlens: the batch's document boundaries (document_cu_seqlens), for a varlen kernel (pick_varlen).
        rope: the (cos, sin) tables for this width when the caller computes them (LoRA TTT; see lora_losses)."""
        s = self.settings
        embedded = self.tok_emb(input_ids)
        if self.bigram is not None:
            embedded = embedded + self.bigram(input_ids)
        x = rms_norm(embedded.to(compute_dtype(input_ids.device)))
        if extra_embedding is not None:  # eval-time hash embedding, added to the normed token embedding
            x = x + extra_embedding(input_ids).to(x.dtype)
        if self.smear is not None:
            x = self.smear(x, input_ids, self.bos_id)
        x0 = x
        # The stretch references TRAIN_SEQ_LEN, which with TRAIN_SEQ_SCHEDULE is the final, longest length:
        # every scheduled length then gets the same unstretched tables (position p rotates alike in every
        # phase), and evaluation stretches only beyond the longest context the model was trained on.
        if rope is None:
            rope = rope_tables(input_ids.size(1), s.rope_dims, s.rope_base, s.train_seq_len, x.device, x.dtype)
        values = self.value_embed.per_layer(input_ids, x.dtype) if self.value_embed is not None else {}
        schedule = self.schedule()
        num_encoder = len(schedule) // 2
        skips, lanes, holder = [], (x,), ONE_LANE
        if cu_seqlens is not None and self.varlen_attention is not None:
            attend = bind_varlen(self.varlen_attention, cu_seqlens)
        else:
            attend = (self.bind_one_document if one_document_per_row else self.bind_attention)(input_ids, self.bos_id)
        for pos, (i, form, mlp) in enumerate(zip(schedule, self.forms(schedule), self.visit_mlps(schedule))):
            ctx = LayerContext(rope, attend, lora.adapter(pos) if lora is not None else None, mlp, values.get(i))
            j = pos - num_encoder
            if 0 <= j < self.skip_weights.size(0) and skips:
                lanes = holder.skip(self, lanes, skips.pop(), j)  # the form holding the lanes takes the skip
            lanes, holder = form.enter(lanes), form
            lanes = form.block(self, i, lanes, x0, ctx)
            if pos < num_encoder:
                skips.append(lanes[0])
        return rms_norm(holder.merge(self, lanes))

    def head(self, hidden):
        """The tied output head: raw logits in the compute dtype, before the softcap."""
        return F.linear(hidden, self.tok_emb.weight.to(hidden.dtype))

    def logits(self, hidden, lora=None):
        z = self.head(hidden).float()
        delta = lora.head(hidden) if lora is not None else None
        if delta is not None:
            z = z + delta.float()
        c = self.settings.logit_softcap
        return c * torch.tanh(z / c)

    def token_losses(self, input_ids, target_ids, lora=None, extra_embedding=None, one_document_per_row=False,
                     hints=None, rope=None):
        """Per-position natural-log NLL (fp32) of target_ids [B, K] given input_ids [B, T]: the last K
        positions only when K < T (sliding windows score a short tail, so the head skips the rest).
        hints [B, K] (NGRAM_TILT; -1 = none): the NLL under the n-gram-tilted distribution instead."""
        hidden = self.forward_hidden(input_ids, lora, extra_embedding, one_document_per_row, rope=rope)
        # The last K positions, gathered rather than sliced or branched on: a dynamic-T graph (LoRA TTT)
        # would otherwise guard on K < T, or on T == K through the slice's strides, and recompile.
        T, K = hidden.size(1), target_ids.size(1)
        hidden = hidden.index_select(1, torch.arange(T - K, T, device=hidden.device))
        z = self.logits(hidden, lora)
        if hints is not None:
            z = ngram_tilt(z, hints, self.settings.ngram_tilt_beta)
        return F.cross_entropy(z.view(-1, z.size(-1)), target_ids.reshape(-1), reduction="none").view(target_ids.shape)

    def forward(self, input_ids, target_ids, cu_seqlens=None):
        """Mean training loss; cu_seqlens: the batch's document boundaries when a varlen kernel trains."""
        hidden = self.forward_hidden(input_ids, cu_seqlens=cu_seqlens)
        if self.loss_kernel == "triton" and hidden.dtype == torch.bfloat16:
            z = self.head(hidden)
            losses, _ = torch.ops.pgolf.softcap_ce(z.view(-1, z.size(-1)), target_ids.reshape(-1),
                                                   self.settings.logit_softcap)
            return losses.mean()
        z = self.logits(hidden)
        return F.cross_entropy(z.view(-1, z.size(-1)), target_ids.reshape(-1))

    # --- reporting -------------------------------------------------------------------------------

    def matmul_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 6 x multiply-adds), attention included, for the current "
          "schedule."""
        schedule = self.schedule()
        matrices = sum(p.numel() for i in schedule for p in self.blocks[i].parameters() if p.ndim == 2)
        attending = sum(self.blocks[i].attn is not None for i in schedule)
        attention = 6 * attending * self.dim * seq_len  # causal QK^T and AV: 2 * (T/2) * dim multiply-adds each, x3
        return 6.0 * (matrices + self.vocab_size * self.dim) + attention

    def lane_report(self) -> list[str]:
        s = self.settings
        schedule = virtual_layers(s.num_layers, s.num_loops, s.loop_start, s.loop_end, True)
        return self.residual.report(self, self.parallel_positions(schedule), schedule)


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# =================================================================================================
# OPTIMIZER: Muon for block matrices, AdamW for the embedding and control tensors
# =================================================================================================

NS_COEFFICIENTS = {
    # (a, b, c) per iteration of X <- aX + (bA + cA^2)X with A = XX^T.
    "quintic": ((3.4445, -4.7750, 2.0315),),  # the standard Muon quintic, reused every iteration
    "polar_express": (  # per-iteration minimax coefficients (Polar Express, Amsel et al. 2025)
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}


def newton_schulz(G: torch.Tensor, steps: int, coeffs: tuple) -> torch.Tensor:
    """Approximate the orthogonal polar factor of each matrix in G [B, r, c] (bf16 in and out)."""
    X = G.bfloat16()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: A = XX^T is then the smaller Gram matrix
        X = X.mT
    # Polar Express coefficients assume singular values <= 1 with a little margin.
    margin = 1.02 if len(coeffs) > 1 else 1.0
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transposed else X


def muon_direction(grad: torch.Tensor, buf: torch.Tensor, coef: torch.Tensor, momentum: torch.Tensor, steps: int,
                   coeffs: tuple, row_normalize: bool) -> torch.Tensor:
    """The orthogonalised update (bf16) of one shape group's shard grad [n, r, c]: clip, momentum, Nesterov,
    MuonEq-R, Newton-Schulz; buf (fp32) is updated in place.

    One function so that one compiled graph does all of a group's elementwise work in a few fused kernels
    instead of a full pass over the group per operation. coef and momentum are 0-d tensors on the device:
    as Python floats they would be baked into the graph, and the momentum warm-up would recompile it every
    step."""
    grad = grad.float() * coef  # (a no-op cast for fp32; a shard reduced in bf16 is widened here)
    buf.mul_(momentum).add_(grad)
    update = torch.addcmul(grad, buf, momentum)  # Nesterov: grad + momentum * buf
    if row_normalize:  # MuonEq-R: equalise row norms before orthogonalising
        update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    return newton_schulz(update, steps, coeffs)


class Muon:
    """MuonEq-R with Nesterov momentum, decoupled weight decay and batched, sharded Newton-Schulz.

    Matrices of the same shape form one group, orthogonalised as one batch. With several ranks the
    group's gradients are reduce-scattered (in comm_dtype) so each rank orthogonalises only its share of
    whole matrices, then the bf16 updates are all-gathered: each group's gather starts as soon as its
    Newton-Schulz is queued, so it travels while the next group computes. The caller hands in the global
    clip coefficient so clipping sees the averaged gradient (the result is then independent of the GPU
    count).

    What stays fp32: the momentum buffers, the clip norm and the weights (bf16 rounding there would
    accumulate over steps). What travels in bf16: the updates (Newton-Schulz works in bf16, so nothing is
    lost) and, with comm_dtype bf16, the gradient sums (Newton-Schulz rounds its input to bf16 anyway; the
    sum itself is rounded once per hop of the ring).
    """

    def __init__(self, named_params, lr, wd, steps, coeffs, row_normalize, rank, world_size, direction,
                 comm_dtype=torch.float32):
        self.lr, self.wd, self.steps, self.coeffs = lr, wd, steps, coeffs
        self.row_normalize = row_normalize
        self.rank, self.world_size = rank, world_size
        self.direction, self.comm_dtype = direction, comm_dtype
        by_shape = {}
        for name, p in named_params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        # Largest groups first so their communication starts earliest.
        self.groups = sorted(by_shape.values(), key=lambda ps: -ps[0].numel() * len(ps))
        self.params = [p for ps in self.groups for p in ps]
        self.shard_sizes = [math.ceil(len(ps) / world_size) for ps in self.groups]
        self.scales = [max(1.0, ps[0].shape[0] / ps[0].shape[1]) ** 0.5 for ps in self.groups]
        self.momentum = [torch.zeros((n, *ps[0].shape), device=ps[0].device)
                         for n, ps in zip(self.shard_sizes, self.groups)]
        device = self.groups[0][0].device if self.groups else None
        self.momentum_now = torch.zeros((), device=device)  # set by fill_: no host-to-device copy, no sync

    def reduce_grads(self):
        """Start summing this rank's gradients; returns [(handle or None, shard grad [n, r, c])].

        The shards hold sums over ranks (in comm_dtype), not averages: step() folds the 1/world_size into
        the clip coefficient rather than spend a pass over every shard on it."""
        pending = []
        for params, n in zip(self.groups, self.shard_sizes):
            stacked = torch.stack([p.grad for p in params])
            if self.world_size == 1:
                pending.append((None, stacked))
                continue
            padded = stacked.new_zeros((n * self.world_size, *stacked.shape[1:]), dtype=self.comm_dtype)
            padded[:len(params)] = stacked
            shard = padded.new_empty((n, *stacked.shape[1:]))
            handle = dist.reduce_scatter_tensor(shard, padded, op=dist.ReduceOp.SUM, async_op=True)
            pending.append((handle, shard))
        return pending

    @staticmethod
    def wait(pending):
        """The shards of reduce_grads, once their reductions are done (on a GPU: queued after them)."""
        for handle, _ in pending:
            if handle is not None:
                handle.wait()
        return [shard for _, shard in pending]

    def squared_norm(self, shards) -> torch.Tensor:
        """This rank's part of the squared global norm of the averaged matrix gradients (ranks hold disjoint
        shards, so the parts add up across ranks)."""
        norms = torch._foreach_norm(shards, 2, dtype=torch.float32)
        sq = torch.stack(norms).square().sum()
        return sq if self.world_size == 1 else sq / self.world_size ** 2

    @torch.no_grad()
    def step(self, shards, lr_mul: float, momentum: float, clip_coef: torch.Tensor):
        lr = self.lr * lr_mul
        coef = clip_coef if self.world_size == 1 else clip_coef / self.world_size  # the shards are sums
        self.momentum_now.fill_(momentum)
        gathers = []
        for n, buf, grad in zip(self.shard_sizes, self.momentum, shards):
            ortho = self.direction(grad, buf, coef, self.momentum_now, self.steps, self.coeffs, self.row_normalize)
            if self.world_size == 1:
                gathers.append((None, ortho))
                continue
            full = ortho.new_empty((n * self.world_size, *ortho.shape[1:]))
            gathers.append((dist.all_gather_into_tensor(full, ortho.contiguous(), async_op=True), full))
        # Weight decay needs none of the gathered updates, so it runs while the last gathers are in flight.
        torch._foreach_mul_(self.params, 1.0 - lr * self.wd)
        for params, scale, (handle, ortho) in zip(self.groups, self.scales, gathers):
            if handle is not None:
                handle.wait()
            torch._foreach_add_(params, list(ortho[:len(params)].float().unbind(0)), alpha=-lr * scale)


def split_parameters(model: GPT):
    """(Muon matrices, the embedding tables, control tensors), each a list of (name, param).

    Muon gets exactly the weights of the linear layers (blocks, untied loop MLPs, the BigramHash and
    value-embedding projections); the token-indexed tables (GPT.embedding_tables) train with the tied
    embedding's AdamW; 2-D control tensors such as resid_mix [2, dim] or skip_weights stay with AdamW."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, CastedLinear)}
    tables = {id(t) for t in model.embedding_tables()}
    matrices, embedding, scalars = [], [], []
    for name, p in model.named_parameters():
        if id(p) in tables:
            embedding.append((name, p))
        elif id(p) in linear_weights:
            matrices.append((name, p))
        else:
            scalars.append((name, p))
    return matrices, embedding, scalars


_COMPILED_MUON_DIRECTION = None


def muon_direction_fn(compile_it: bool):
    """muon_direction, compiled once per process when asked (optimizers are rebuilt after warm-up)."""
    global _COMPILED_MUON_DIRECTION
    if not compile_it:
        return muon_direction
    if _COMPILED_MUON_DIRECTION is None:
        _COMPILED_MUON_DIRECTION = compiled(muon_direction, True)
    return _COMPILED_MUON_DIRECTION


COMM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Optimizers:
    """Everything one optimizer step does: average gradients across ranks, clip, Muon + AdamW.

    The step never waits on the GPU from the host (no .item(), no tensor truth value): the gradient norm
    and the clip coefficient stay 0-d device tensors, and collectives are started asynchronously."""

    def __init__(self, model: GPT, s: Settings, rt: "Runtime"):
        self.settings, self.world_size = s, rt.world_size
        matrices, embedding, scalars = split_parameters(model)
        direction = muon_direction_fn(s.compile and rt.device.type == "cuda")
        self.muon = Muon(matrices, s.matrix_lr, s.muon_wd, s.muon_backend_steps, NS_COEFFICIENTS[s.muon_ns_coeffs],
                         s.muon_row_normalize, rt.rank, rt.world_size, direction, COMM_DTYPES[s.muon_comm_dtype])
        # Fused AdamW on a GPU is already one multi-tensor kernel per group for all its small tensors.
        fused = rt.device.type == "cuda"
        adam = dict(betas=(s.beta1, s.beta2), eps=s.adam_eps, fused=fused)
        self.adam_groups = [
            torch.optim.AdamW([p for _, p in embedding], lr=s.tied_embed_lr, weight_decay=s.embed_wd, **adam),
            torch.optim.AdamW([p for _, p in scalars], lr=s.scalar_lr, weight_decay=s.adam_wd, **adam),
        ]
        self.base_lrs = [s.tied_embed_lr, s.scalar_lr]
        self.replicated = [p for _, p in embedding + scalars]
        self.all_params = [p for _, p in matrices] + self.replicated

    def momentum_at(self, step: int) -> float:
        s = self.settings
        frac = min(step / s.muon_momentum_warmup_steps, 1.0) if s.muon_momentum_warmup_steps > 0 else 1.0
        return (1 - frac) * s.muon_momentum_warmup_start + frac * s.muon_momentum

    def reduce_replicated(self, grads):
        """Start one flat fp32 all-reduce of every replicated gradient (AdamW's embedding and control tensors stay
        fp32: they are an eighth of the bytes, and the small gains and mixes are the most sensitive weights)."""
        if self.world_size == 1:
            return None
        flat = torch.cat([g.reshape(-1) for g in grads])
        return dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True), flat

    def finish_replicated(self, grads, pending):
        if pending is None:
            return
        handle, flat = pending
        handle.wait()
        flat.mul_(1.0 / self.world_size)
        parts = torch.split(flat, [g.numel() for g in grads])
        torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(parts, grads)])

    @torch.no_grad()
    def step(self, step: int, lr_mul: float) -> torch.Tensor:
        """One update; returns the global gradient norm (before clipping) as a 0-d tensor."""
        for p in self.all_params:
            if p.grad is None:  # unused by this step's schedule (untied loop MLPs before looping starts)
                p.grad = torch.zeros_like(p)
        pending = self.muon.reduce_grads()
        grads = [p.grad for p in self.replicated]
        replicated = self.reduce_replicated(grads)
        shards = Muon.wait(pending)
        self.finish_replicated(grads, replicated)
        # Squared norm: Muon shards are disjoint across ranks; replicated grads count 1/world_size per rank.
        sq = self.muon.squared_norm(shards)
        sq = sq + torch.stack(torch._foreach_norm(grads)).square().sum() / self.world_size
        if self.world_size > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        norm = sq.sqrt()
        clip = self.settings.grad_clip_norm
        coef = (clip / (norm + 1e-6)).clamp(max=1.0) if clip > 0 else torch.ones_like(norm)
        self.muon.step(shards, lr_mul, self.momentum_at(step), coef)
        torch._foreach_mul_(grads, coef)
        for opt, base in zip(self.adam_groups, self.base_lrs):
            for group in opt.param_groups:
                group["lr"] = base * lr_mul
            opt.step()
        return norm

    def zero_grad(self):
        for p in self.all_params:
            p.grad = None


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """Flat at 1, then linear to 0 over the last warmdown_frac of training, floored at min_lr."""
    if warmdown_frac <= 0 or frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr)


class EMA:
    """fp32 exponential moving average of the weights, updated after every step.

    With warmup (EMA_WARMUP) the n-th update (n = 0, 1, ...) uses decay min(decay, (1 + n) / (10 + n)), the
    usual warm-up of a weight average: the first update keeps 10% of the initial weights instead of `decay`
    of them, and the average widens as training goes on until it reaches `decay`."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self):
        weight = 1.0 - self.current_decay()  # a host float: no device sync
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)
        self.updates += 1

    @torch.no_grad()
    def restart(self, params):
        """Restart the average of params at their current values (weights that jumped: the untied MLPs
        copied in at the loop switch)."""
        chosen = {id(p) for p in params}
        for p, e in zip(self.params, self.shadow):
            if id(p) in chosen:
                e.copy_(p.detach().float())

    @torch.no_grad()
    def copy_to_model(self):
        for p, e in zip(self.params, self.shadow):
            p.copy_(e.to(p.dtype))


# =================================================================================================
# QUANTIZATION AND PACKING: GPTQ with SDClip, the artifact format, exact byte accounting
# =================================================================================================
# After training, every block matrix is rounded to MATRIX_BITS (int6) and the tied embedding to
# EMBED_BITS (int8) with GPTQ: columns are rounded one at a time and each rounding error is pushed
# onto the not-yet-rounded columns in proportion to the inverse Hessian of that layer's inputs,
# so the layer's *output* error stays small. Hessians H = sum X^T X come from training batches
# (never validation tokens) and count against the training budget. Each row gets one fp16 scale
# from SDClip: s = k * std(row) / q_max, so k (the CLIP_SIGMAS settings) trades artifact size for
# rounding error. Small float tensors (gains, mixes, lambdas) ship as fp16.
#
# With several ranks, each collects Hessians on its own micro-batches and they are all-reduced (8x
# the calibration data in the same time). Rank 0 alone runs GPTQ, compresses and writes the artifact
# (GPTQ is seconds on one GPU; the file must come from one place); the other ranks wait, then every
# rank rebuilds the model from that file for the roundtrip evaluation.


def quantized_linears(model: GPT) -> dict:
    """{weight name: CastedLinear} for every matrix GPTQ rounds through its input Hessian."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, CastedLinear)}


def hessian_source(weight_name: str) -> str:
    """c_k and c_v read the same normed input as c_q, so the three share c_q's Hessian."""
    for sibling in (".attn.c_k.", ".attn.c_v."):
        if sibling in weight_name:
            return weight_name.replace(sibling, ".attn.c_q.")
    return weight_name


@torch.no_grad()
def collect_hessians(model: GPT, batches, rt: Runtime) -> dict:
    """{weight name: H [cols, cols] fp32} = sum of x x^T over every row x that entered the matrix,
    summed over all ranks and divided by the number of calibration tokens.

    `batches` yields token windows [n, seq+1]; the model runs in eval mode with its current
    `looping`, so looped layers add every visit. The tied embedding is calibrated as the output
    head: its input is the final-norm output (GPT.forward_hidden's return value). Every rank
    calibrates on its own batches and all-reduces, so all ranks hold the same H built from
    world_size times more data in the same time.
    """
    sums = {}

    def add(name, x):
        x = x.detach().reshape(-1, x.size(-1)).float()
        if name not in sums:
            sums[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
        sums[name].addmm_(x.T, x)

    hooks = [module.register_forward_hook(lambda m, inputs, out, name=name: add(name, inputs[0]))
             for name, module in quantized_linears(model).items() if hessian_source(name) == name]
    was_training = model.training
    model.eval()
    tokens = torch.zeros((), dtype=torch.float64, device=rt.device)
    try:
        for batch in batches:
            x = batch[:, :-1].to(rt.device, non_blocking=True)
            add("tok_emb.weight", model.forward_hidden(x))
            tokens += x.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    rt.all_reduce(tokens)
    for H in sums.values():
        rt.all_reduce(H).div_(tokens.item())
    return {name: sums[hessian_source(name)] for name in [*quantized_linears(model), "tok_emb.weight"]}


def calibration_batches(loader: TrainLoader, count: int):
    """This rank's first `count` micro-batches of a fresh training loader (training shards only), yielded one
    at a time so that reading the next overlaps the GPU's work on this one. Counting micro-batches per rank
    (not global steps) makes the Hessian time the same on 1 and 8 GPUs: with 8 the all-reduced Hessians see
    8x the tokens (exactly the first `count` global steps), with 1 the first count/8 steps."""
    taken = 0
    while taken < count:
        for batch in loader.next_step()[:count - taken]:
            taken += 1
            yield batch


def calibration_reserve(trainer, probe: int = 2) -> tuple:
    """(seconds, how) to keep for GPTQ calibration after the training loop, measured before it: `probe`
    extra calibration micro-batches (or, for selfgen, one sampling forward of a full batch) are timed on the model
    as it is now (same shapes, looping as it will be), after one untimed batch has warmed the kernels; the
    reserve is 1.25x the projection to GPTQ_CALIBRATION_BATCHES plus 1 s for the loader and the all-reduce."""
    s, rt, model = trainer.s, trainer.rt, trainer.model
    looping, model.looping = model.looping, trainer.can_loop
    if s.gptq_calibration == "selfgen":
        # Sampling runs one forward per new token at a few bucketed lengths (selfgen_forward_lengths): time one
        # warm forward at each length and weight it by how many tokens are sampled at that length.
        batch_size = min(SELFGEN_BATCH_SIZE, s.gptq_calibration_batches)
        per_batch = 0.0
        with torch.no_grad():
            model.eval()
            for length, steps in selfgen_forward_lengths(s.train_seq_len).items():
                x = torch.randint(0, s.vocab_size, (batch_size, length), device=rt.device)
                model.logits(model.forward_hidden(x)[:, -1:])  # untimed: first call at a shape builds its plans
                rt.sync()
                t0 = time.perf_counter()
                model.logits(model.forward_hidden(x)[:, -1:])
                rt.sync()
                per_batch += (time.perf_counter() - t0) * steps
            model.train()
        projected = per_batch * math.ceil(s.gptq_calibration_batches / batch_size)
        how = f"selfgen batch_size:{batch_size} measured_batch_seconds:{per_batch:.2f}"
    else:
        # Two timed calls, of 1 and of 1 + probe batches: their difference is the per-batch cost, the rest the
        # fixed cost of a call (hooks, the Hessians' allocation and all-reduce), which one call pays once.
        batches = list(calibration_batches(trainer.new_loader(), probe + 2))
        collect_hessians(model, batches[:1], rt)  # untimed: warms the kernels
        seconds = []
        for timed_batches in (batches[1:2], batches[1:]):
            rt.sync()
            t0 = time.perf_counter()
            collect_hessians(model, timed_batches, rt)
            rt.sync()
            seconds.append(time.perf_counter() - t0)
        per_batch = max(seconds[1] - seconds[0], 0.0) / probe
        fixed = max(seconds[0] - per_batch, 0.0)
        projected = fixed + per_batch * s.gptq_calibration_batches
        how = f"train measured_batch_seconds:{per_batch:.4f} fixed_seconds:{fixed:.3f}"
    model.looping = looping
    return 1.25 * projected + 1.0, how


SELFGEN_BATCH_SIZE = 8  # sequences sampled together
SELFGEN_LENGTH_STEP = 256  # forward lengths are multiples of this: a handful of shapes, not one per token


def selfgen_forward_length(known: int, seq_len: int) -> int:
    """Length of the forward that samples the token after `known` ones: the prefix rounded up to
    SELFGEN_LENGTH_STEP, at most seq_len."""
    return min(-(-known // SELFGEN_LENGTH_STEP) * SELFGEN_LENGTH_STEP, seq_len)


def selfgen_forward_lengths(seq_len: int) -> dict:
    """{forward length: tokens sampled at it} for sampling seq_len tokens after a first one. The prefix lives
    in a fixed buffer and each new token's forward runs over the prefix rounded up to SELFGEN_LENGTH_STEP:
    the model is causal, so the padding after the prefix cannot change the last prefix position's logits,
    and a handful of shapes replaces one new shape per token (every new length rebuilt the attention kernels'
    plans: 8 x 2048 tokens took 152 s that way on the H200, 41.6 s bucketed, Hessians included; 2026-12-04)."""
    lengths = {}
    for known in range(1, seq_len + 1):
        length = selfgen_forward_length(known, seq_len)
        lengths[length] = lengths.get(length, 0) + 1
    return lengths


@torch.no_grad()
def selfgen_batches(model: GPT, n: int, seq_len: int, vocab_size: int, seed: int, device,
                    batch_size: int = SELFGEN_BATCH_SIZE):
    """n sequences of seq_len+1 tokens the model samples itself (temperature 0.8, a uniformly random
    first token), in batches of batch_size. No KV cache: each token costs a forward over its prefix, padded
    to a bucketed length (selfgen_forward_lengths), so this is far slower than reading training batches;
    for experiments where training data must not be read."""
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    for b in range(0, n, batch_size):
        rows = min(batch_size, n - b)
        seqs = torch.zeros(rows, seq_len + 1, dtype=torch.int64, device=device)
        seqs[:, 0] = torch.randint(0, vocab_size, (rows,), device=device, generator=gen)
        for known in range(1, seq_len + 1):
            hidden = model.forward_hidden(seqs[:, :selfgen_forward_length(known, seq_len)])[:, known - 1:known]
            probs = torch.softmax(model.logits(hidden)[:, 0].float() / 0.8, dim=-1)
            seqs[:, known] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        out.append(seqs.cpu())
    model.train(was_training)
    return out


def sdclip_scales(W: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """Per-row fp16 scales k*std(row)/q_max of W [..., rows, cols].

    Clamped to the smallest positive fp16 (the 1e-10 floor of the reference rounds to 0 in fp16),
    so an all-zero row divides by a tiny number instead of zero."""
    q_max = 2 ** (bits - 1) - 1
    scale = clip_sigmas * W.float().std(dim=-1) / q_max
    return scale.clamp_min(2.0 ** -24).half()


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, q_max) -> torch.Tensor:
    """clamp(round(w / scale), -q_max, q_max) as float; scale (and a tensor q_max) broadcast against w."""
    return torch.clamp(torch.round(w / scale), -q_max, q_max)


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U with U^T U = H^-1 for a batch of SPD H [B, C, C]. A matrix whose factorisation fails in
    floating point gets its diagonal raised by 1% of its mean until it succeeds (rare after damping)."""
    eye = torch.eye(H.size(-1), device=H.device, dtype=H.dtype)
    bump = 0.01 * H.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
    for _ in range(20):
        L, info = torch.linalg.cholesky_ex(H)
        U, info_inverse = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        failed = (info > 0) | (info_inverse > 0) | ~torch.isfinite(U).all(dim=(-2, -1))
        if not failed.any():
            return U
        H = H + bump * failed[:, None, None]
    raise RuntimeError("GPTQ: a Hessian stays singular after damping; raise GPTQ_DAMP")


@contextlib.contextmanager
def full_fp32_matmuls():
    """GPTQ inverts ill-conditioned Hessians: keep TF32's 10-bit mantissa out of its matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def gptq_prepare(W: torch.Tensor, H: torch.Tensor, bits: int, clip_sigmas: float, damp: float) -> tuple:
    """What both GPTQ solves start from, for W [B, rows, cols] and H [B, cols, cols]: (W with dead columns
    zeroed and its columns in act-order, the fp16 row scales of the original W, the act-order permutation
    [B, cols], U with U^T U = the damped, permuted H^-1).

    Dead inputs (H_jj = 0) get H_jj = 1 and a zeroed weight column; damping adds damp * mean(diag H);
    act-order visits columns by descending H_jj (the most active inputs are rounded first, while the most
    columns remain to absorb their error). Scales come from the original W, so they do not depend on the
    rounding path."""
    W, H = W.float().clone(), H.float().clone()
    B, rows, cols = W.shape
    scale = sdclip_scales(W, bits, clip_sigmas)
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    W.masked_fill_(dead[:, None, :], 0.0)
    diag.masked_fill_(dead, 1.0)
    diag.add_(damp * diag.mean(-1, keepdim=True))
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
    W = W.gather(2, perm[:, None, :].expand(B, rows, cols))
    H = H.gather(1, perm[:, :, None].expand(B, cols, cols)).gather(2, perm[:, None, :].expand(B, cols, cols))
    return W, scale, perm, upper_cholesky_of_inverse(H)


def unpermute_columns(Q: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Q [B, rows, cols] with its columns in perm's order, back in the original order."""
    B, rows, cols = Q.shape
    return Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(B, rows, cols))


@torch.no_grad()
@full_fp32_matmuls()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, clip_sigmas: float, block_size: int = 128,
                  damp: float = 0.01, hi_cols: torch.Tensor | None = None, hi_bits: int = 8):
    """GPTQ-round W [rows, cols] (or a batch [B, rows, cols] with H [B, cols, cols]) to integers in
    [-q_max, q_max]. Returns (q int8 like W, scale fp16 [..., rows]); W ~ q * scale[..., None].

    After gptq_prepare, inside a block of block_size columns the loop runs column by column, vectorised
    over rows and over the batch; the block's accumulated error then updates all later columns in one matmul.

    hi_cols (bool [..., cols], AWQ-lite): those input columns round on the hi_bits grid over the same clip
    range (scale * q_max / q_hi), inside the same solve, so the other columns absorb their smaller errors.
    """
    batched = W.dim() == 3
    W, scale, perm, U = gptq_prepare(W if batched else W[None], H if batched else H[None], bits, clip_sigmas, damp)
    cols = W.shape[2]
    q_max = 2 ** (bits - 1) - 1
    s = scale.float()[:, :, None]  # the fp16 value that ships is the one we round against
    Q = torch.empty_like(W)
    if hi_cols is not None:
        hi = (hi_cols if batched else hi_cols[None]).to(W.device).gather(1, perm)[:, None, :]  # [B, 1, cols]
        q_hi = 2 ** (hi_bits - 1) - 1
        s_hi = s * (q_max / q_hi)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        Wb, Ub = W[:, :, start:end].clone(), U[:, start:end, start:end]
        errors = torch.empty_like(Wb)
        for j in range(end - start):
            w = Wb[:, :, j:j + 1]
            step, limit = s, q_max
            if hi_cols is not None:
                use = hi[:, :, start + j:start + j + 1]
                step, limit = torch.where(use, s_hi, s), torch.where(use, q_hi, q_max)
            q = round_to_grid(w, step, limit)
            Q[:, :, start + j:start + j + 1] = q
            err = (w - q * step) / Ub[:, j:j + 1, j:j + 1]
            Wb[:, :, j:] -= err * Ub[:, j:j + 1, j:]
            errors[:, :, j:j + 1] = err
        W[:, :, end:] -= errors @ U[:, start:end, end:]
    Q = unpermute_columns(Q, perm).to(torch.int8)
    return (Q, scale) if batched else (Q[0], scale[0])


# --- trellis-coded quantization (GPTQ_TCQ) ---------------------------------------------------------------
# Rounding each weight to the nearest point of a scalar grid leaves rate on the table: an 8-state trellis over
# a grid twice as fine reaches the same Hessian-weighted error with about 0.15 bit less per weight once
# entropy-coded (tests/test_tcq.py measures it on a synthetic layer; GPTQ_TCQ_STATES up to 256 gain up to 0.06
# bit more). The fine grid, step d = GPTQ_TCQ_STEP x the scalar step, is split into four subsets by v mod 4. A
# trellis state allows two of them: the even values in even states, the odd ones in odd states. So a weight
# costs one symbol (v - parity) / 2, a grid of step 2d, and the subset it used moves the state on (TCQ_NEXT).
# The encoder searches, for each row, the path through the trellis with the least GPTQ error (Viterbi, one
# survivor per state, each survivor with its own GPTQ error feedback), along GPTQ's act-order column order,
# which the artifact stores (2 bytes a column, once for tensors that share it). The decoder only follows the
# trellis: one step per column, vectorised over rows.
TCQ_STATES = 8  # the default trellis, the one measured on trained weights
# TCQ_NEXT[state][v mod 4]: the next state after a value of that subset; -1 where the state does not allow it.
# Every state is entered by exactly two branches, and those carry subsets of one parity. (This 8-state table
# predates the generated ones below; it labels its states differently from Ungerboeck's (13, 04) code and
# performs the same: 1.084 dB on uniform data. Artifacts of the default decode with it.)
TCQ_NEXT = ((0, -1, 1, -1), (-1, 2, -1, 3), (5, -1, 4, -1), (-1, 7, -1, 6),
            (1, -1, 0, -1), (-1, 3, -1, 2), (4, -1, 5, -1), (-1, 6, -1, 7))
# Other state counts (GPTQ_TCQ_STATES) come from Ungerboeck's rate-1/2 codes for one-dimensional signals (the
# trellises TCQ uses), by their parity-check polynomials (h0, h1) in octal; 8 states use TCQ_NEXT, the same code
# as (0o13, 0o04) under other state labels. Their granular gains on uniform data, from tests/test_tcq.py's
# measurement: 4 states 0.997 dB, 8 1.084, 16 1.147, 32 1.206, 64 1.251, 128 1.298, 256 1.333 (the 256-state
# figure of the TCQ literature; 1.53 dB is the bound).
TCQ_PARITY_CHECKS = {4: (0o5, 0o2), 8: (0o13, 0o04), 16: (0o23, 0o04), 32: (0o45, 0o10), 64: (0o103, 0o024),
                     128: (0o235, 0o126), 256: (0o515, 0o362)}


@functools.lru_cache(maxsize=None)
def tcq_trellis(states: int) -> tuple:
    """The next-state table (as TCQ_NEXT) of a trellis with this many states.

    The systematic feedback encoder of parity checks h0, h1 with memory nu (states = 2^nu), in observer form:
    state bits w_1..w_nu (state = sum w_i 2^(i-1)); a branch's value has parity z0 = w_1 (so the state's parity
    rule holds) and second bit z1, the free choice, subset = 2 z1 + z0 = v mod 4; then
    w_i <- w_(i+1) + h1_i z1 + h0_i z0 for i < nu, and w_nu <- z0 (h0_nu = 1, h1_nu = 0), over GF(2)."""
    if states == TCQ_STATES:
        return TCQ_NEXT
    h0, h1 = TCQ_PARITY_CHECKS[states]
    nu = states.bit_length() - 1
    table = []
    for state in range(states):
        w = [(state >> i) & 1 for i in range(nu)] + [0]  # w[i] is w_(i+1); w[nu] pads w_(nu+1) = 0
        row, z0 = [-1] * 4, w[0]
        for z1 in (0, 1):
            new = [w[i + 1] ^ (z1 & (h1 >> (i + 1))) ^ (z0 & (h0 >> (i + 1))) for i in range(nu)]
            row[2 * z1 + z0] = sum(bit << i for i, bit in enumerate(new))
        table.append(tuple(row))
    return tuple(table)


def tcq_branches(device, states: int = TCQ_STATES) -> tuple:
    """(source state, subset) of the 2 x states branches, ordered by their next state: rows 2k and 2k+1 enter
    state k."""
    branches = sorted((nxt, state, subset) for state, row in enumerate(tcq_trellis(states))
                      for subset, nxt in enumerate(row) if nxt >= 0)
    source = torch.tensor([b[1] for b in branches], device=device)
    subset = torch.tensor([b[2] for b in branches], device=device)
    return source, subset


def tcq_values(symbols: torch.Tensor, states: int = TCQ_STATES) -> torch.Tensor:
    """The fine-grid values v (int64) that symbols [..., n] stand for along the trellis (from state 0)."""
    following = torch.tensor(tcq_trellis(states), device=symbols.device)
    state = torch.zeros(symbols.shape[:-1], dtype=torch.int64, device=symbols.device)
    values = torch.empty(symbols.shape, dtype=torch.int64, device=symbols.device)
    for j in range(symbols.shape[-1]):
        v = 2 * symbols[..., j].long() + (state & 1)
        values[..., j] = v
        state = following[state, v % 4]
    return values


@torch.no_grad()
@full_fp32_matmuls()
def tcq_gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, clip_sigmas: float, step_ratio: float,
                      block_size: int = 128, damp: float = 0.01, states: int = TCQ_STATES):
    """GPTQ with trellis-coded rounding (see above) of W [B, rows, cols] with H [B, cols, cols]. Returns
    (symbols int8 [B, rows, cols], scale fp16 [B, rows], order int64 [B, cols]): the values along the
    trellis are tcq_values(symbols[..., order], states), and W[..., order] ~ those values * scale * step_ratio.

    The fine grid spans the scalar grid's clip range: |v| <= q_max / step_ratio. Inside a block every
    survivor carries its own copy of the block's columns with its own error feedback; at the block's end
    each row keeps its best survivor (the path is traced back), the block's errors update the later columns
    in one matmul as in gptq_quantize, and the search goes on from that survivor's state alone."""
    W, scale, perm, U = gptq_prepare(W, H, bits, clip_sigmas, damp)
    B, rows, cols = W.shape
    d = scale.float()[None] * step_ratio                         # [1, B, rows]: the fine step of each row
    v_max = int((2 ** (bits - 1) - 1) / step_ratio)
    source, subset = tcq_branches(W.device, states)
    sub = subset.float()[:, None, None]
    # per branch, the lowest and highest value of its subset inside [-v_max, v_max]
    v_low = (-v_max + (subset + v_max) % 4).float()[:, None, None]
    v_high = (v_max - (v_max - subset) % 4).float()[:, None, None]
    S = states
    cost = torch.full((S, B, rows), float("inf"), device=W.device)
    cost[0] = 0.0                                                 # every row starts in state 0
    values = torch.empty(B, rows, cols, device=W.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        K = end - start
        Ub = U[:, start:end, start:end]
        # each survivor's own copy of the block's columns not yet rounded: column j of the block is ahead[..., 0]
        ahead = W[None, :, :, start:end].expand(S, B, rows, K).clone()
        came_from = torch.empty(K, S, B, rows, dtype=torch.uint8, device=W.device)  # states <= 256: a byte each
        chosen = torch.empty(K, S, B, rows, device=W.device)
        errors = torch.empty(K, S, B, rows, device=W.device)
        for j in range(K):
            u_jj = Ub[:, j, j][None, :, None]
            w = ahead[source, :, :, 0]                            # [2S, B, rows]: each branch's weight
            v = (4 * torch.round((w / d - sub) / 4) + sub).clamp_(v_low, v_high)
            err = (w - v * d) / u_jj
            total = (cost[source] + err * err).view(S, 2, B, rows)  # a state not reached yet costs inf
            pick = total.argmin(1, keepdim=True)                  # [S, 1, B, rows]: the cheaper way into each state
            cost = total.gather(1, pick)[:, 0]
            branch = (2 * torch.arange(S, device=W.device)[:, None, None] + pick[:, 0])
            previous = source[branch]
            came_from[j] = previous
            chosen[j] = v.gather(0, branch)
            errors[j] = err.gather(0, branch)
            ahead = ahead[..., 1:].gather(0, previous[..., None].expand(S, B, rows, K - j - 1))
            ahead -= errors[j][..., None] * Ub[:, j, j + 1:][None, :, None, :]
        last_state = state = cost.argmin(0)                       # [B, rows]: each row's best survivor
        block_errors = torch.empty(B, rows, K, device=W.device)
        for j in reversed(range(K)):
            values[:, :, start + j] = chosen[j].gather(0, state[None])[0]
            block_errors[:, :, j] = errors[j].gather(0, state[None])[0]
            state = came_from[j].gather(0, state[None])[0].long()
        W[:, :, end:] -= block_errors @ U[:, start:end, end:]
        cost = torch.full_like(cost, float("inf")).scatter_(0, last_state[None], 0.0)
    symbols = torch.div(values, 2, rounding_mode="floor")       # (v - parity) / 2
    return unpermute_columns(symbols, perm).to(torch.int8), scale, perm


@dataclass
class QTensor:
    """One tensor of the quantized state, as it ships."""
    kind: str                 # "int": GPTQ grid values + per-row scales; "fp16": float passthrough; "raw": as is
    data: torch.Tensor        # int8 grid values / fp16 values / the raw tensor (CPU)
    dtype: torch.dtype        # dtype restored on load
    scale: torch.Tensor | None = None  # fp16 [rows] for kind "int"
    bits: int = 0
    awq: tuple | None = None  # (first column, columns, bits) of the AWQ-lite group, rounded on the finer grid
    lqer: tuple | None = None  # (A int8 [rows, r], A scale fp16 [1], B int8 [r, cols], B scales fp16 [r, groups])
    tcq: tuple | None = None  # GPTQ_TCQ: (column order int64 [cols], fine step ratio, states); data: trellis symbols

    def extras(self) -> dict:
        """What the header records beyond the five plain fields (empty for a plain GPTQ tensor)."""
        out = {}
        if self.awq is not None:
            out["awq"] = list(self.awq)
        if self.lqer is not None:
            out["lqer"] = self.lqer[0].shape[1]
        if self.tcq is not None:
            out["tcq"] = self.tcq[1]
            if self.tcq[2] != TCQ_STATES:  # the default's header stays as it was before other trellises
                out["tcq_states"] = self.tcq[2]
        return out


def tensor_role(name: str) -> str:
    if name == "tok_emb.weight":
        return "embed"
    return "attn" if ".attn." in name else "mlp" if ".mlp." in name else "matrix"


def quantization_plan(name: str, tensor: torch.Tensor, s: Settings, has_hessian: bool):
    """(kind, bits, clip_sigmas) of one state-dict entry: matrices GPTQ can calibrate become integers,
    other floats ship as fp16, anything else as is. ATTN_/MLP_ bits and clips fall back to MATRIX_'s."""
    if not tensor.is_floating_point():
        return "raw", 0, 0.0
    if not has_hessian or tensor.dim() != 2 or tensor.numel() <= s.passthrough_max_numel:
        return "fp16", 0, 0.0
    role = tensor_role(name)
    if role == "embed":
        return "int", s.embed_bits, s.embed_clip_sigmas
    bits = {"attn": s.attn_bits, "mlp": s.mlp_bits}.get(role, 0) or s.matrix_bits
    clip = {"attn": s.attn_clip_sigmas, "mlp": s.mlp_clip_sigmas}.get(role, 0.0) or s.matrix_clip_sigmas
    return "int", bits, clip


def mixed_bit_plan(names: list, hessians: dict, s: Settings) -> dict:
    """{block matrix: bits} under GPTQ_MIXED_BITS: the GPTQ_MIXED_HIGH_FRAC of the block matrices with the
    largest Hessian trace (mean squared input: the layers whose errors the loss sees most, PR #1204) get the
    high bits, the rest the low. Ties (c_q, c_k and c_v share one Hessian) keep state-dict order."""
    low, high = mixed_bits(s)
    blocks = [n for n in names if tensor_role(n) != "embed"]
    ranked = sorted(blocks, key=lambda n: -float(hessians[n].diagonal().sum()))
    n_high = round(s.gptq_mixed_high_frac * len(blocks))
    return {n: high if i < n_high else low for i, n in enumerate(ranked)}


def awq_applies(s: Settings, bits: int, cols: int) -> bool:
    """AWQ_GROUP keeps a column group at AWQ_BITS only where that is more than the tensor's bits and fits."""
    return s.awq_group > 0 and s.awq_bits > bits and cols >= s.awq_group


def awq_salient_group(W: torch.Tensor, H: torch.Tensor, group: int) -> int:
    """First column of the aligned group of `group` input columns with the largest activation RMS x mean
    |weight| (AWQ's salience; RMS = sqrt of the Hessian diagonal, which holds mean x^2: free)."""
    usable = W.shape[-1] // group * group
    salience = H.diagonal().clamp_min(0).sqrt() * W.abs().mean(0)
    return int(salience[:usable].reshape(-1, group).sum(1).argmax()) * group


def awq_column_factor(cols: int, awq: tuple | None, q_max: int) -> torch.Tensor | None:
    """Per input column, the factor on the row scale: q_max / q_hi inside the AWQ group, 1 elsewhere."""
    if awq is None:
        return None
    first, count, hi_bits = awq
    factor = torch.ones(cols)
    factor[first:first + count] = q_max / (2 ** (hi_bits - 1) - 1)
    return factor


LQER_A_LEVELS = (-2, 1)   # int2: four levels, one fp16 scale for all of A
LQER_B_MAX, LQER_B_GROUP = 7, 64  # int4 (symmetric), one fp16 scale per 64 columns of each row of B


def lqer_factors(E: torch.Tensor, rank: int) -> tuple:
    """LQER (PR #1797): a rank-`rank` correction A.B of the quantization error E [rows, cols], quantized:
    A = the top left singular vectors on a 2-bit grid with one scale, then B refit to that rounded A by least
    squares (so B absorbs A's rounding) on a 4-bit grid with a scale per 64 columns. Returns CPU tensors
    (qa int8, a_scale fp16 [1], qb int8, b_scales fp16 [rank, groups])."""
    E = E.float()
    U, _, _ = torch.linalg.svd(E, full_matrices=False)
    A = U[:, :rank]
    a_scale = (A.abs().max() / 2).clamp_min(2.0 ** -24).half().reshape(1)
    qa = torch.clamp(torch.round(A / a_scale.float()), *LQER_A_LEVELS)
    B = torch.linalg.pinv(qa * a_scale.float()) @ E
    groups = -(-B.shape[1] // LQER_B_GROUP)
    padded = torch.nn.functional.pad(B, (0, groups * LQER_B_GROUP - B.shape[1])).reshape(rank, groups, -1)
    b_scale = (padded.abs().amax(-1) / LQER_B_MAX).clamp_min(2.0 ** -24).half()
    qb = torch.clamp(torch.round(B / lqer_group_scales(b_scale, B.shape[1])), -LQER_B_MAX, LQER_B_MAX)
    return tuple(x.cpu().contiguous() for x in (qa.to(torch.int8), a_scale, qb.to(torch.int8), b_scale))


def lqer_group_scales(b_scale: torch.Tensor, cols: int) -> torch.Tensor:
    return b_scale.float().repeat_interleave(LQER_B_GROUP, dim=1)[:, :cols]


def lqer_correction(lqer: tuple) -> torch.Tensor:
    qa, a_scale, qb, b_scale = lqer
    return (qa.float() * a_scale.float()) @ (qb.float() * lqer_group_scales(b_scale, qb.shape[1]))


def dequantize_int(qt: QTensor) -> torch.Tensor:
    """q * row scale (x the AWQ column factor) + the LQER correction, in float32; trellis symbols (GPTQ_TCQ)
    are first turned into their fine-grid values along the stored column order."""
    scale = qt.scale.float()[:, None]
    if qt.tcq is not None:
        order, step_ratio, states = qt.tcq
        W = torch.empty(qt.data.shape)
        W[:, order] = tcq_values(qt.data[:, order], states).float() * (scale * step_ratio)
    else:
        factor = awq_column_factor(qt.data.shape[1], qt.awq, 2 ** (qt.bits - 1) - 1)
        W = qt.data.float() * (scale if factor is None else scale * factor.to(scale.device))
    return W if qt.lqer is None else W + lqer_correction(qt.lqer).to(W.device)


@torch.no_grad()
def quantize_model(state: dict, hessians: dict, s: Settings) -> dict:
    """{name: QTensor} for a state dict and its Hessians (collect_hessians). Matrices of one shape, bit width,
    clip and AWQ group size are GPTQ'd as one batch: one column loop serves all the layers' copies."""
    out, groups, plans = {}, {}, {}
    for name, t in state.items():
        kind, bits, clip = quantization_plan(name, t, s, name in hessians)
        if kind == "int":
            plans[name] = (bits, clip)
        else:
            data = t.detach().cpu()
            out[name] = QTensor(kind, data.half() if kind == "fp16" else data.clone(), t.dtype)
    if mixed_bits(s) is not None:
        plans.update({n: (bits, plans[n][1]) for n, bits in mixed_bit_plan(list(plans), hessians, s).items()})
    for name, (bits, clip) in plans.items():
        awq = awq_applies(s, bits, state[name].shape[1])
        groups.setdefault((tuple(state[name].shape), bits, clip, awq), []).append(name)
    for (shape, bits, clip, awq), names in groups.items():
        W = torch.stack([state[n].detach().float() for n in names])
        H = torch.stack([hessians[n].to(W.device) for n in names])
        if s.gptq_tcq:  # Settings.validate has refused AWQ with it
            q, scale, order = tcq_gptq_quantize(W, H, bits, clip, s.gptq_tcq_step, s.gptq_block_size, s.gptq_damp,
                                                s.gptq_tcq_states)
            for n, qn, sn, on in zip(names, q.cpu(), scale.cpu(), order.cpu()):
                out[n] = QTensor("int", qn.contiguous(), state[n].dtype, sn.contiguous(), bits,
                                 tcq=(on.contiguous(), s.gptq_tcq_step, s.gptq_tcq_states))
            continue
        hi_cols, firsts = None, []
        if awq:
            firsts = [awq_salient_group(W[i], H[i], s.awq_group) for i in range(len(names))]
            hi_cols = torch.zeros(W.shape[0], W.shape[2], dtype=torch.bool)
            for i, first in enumerate(firsts):
                hi_cols[i, first:first + s.awq_group] = True
        q, scale = gptq_quantize(W, H, bits, clip, s.gptq_block_size, s.gptq_damp, hi_cols, s.awq_bits)
        for i, (n, qn, sn) in enumerate(zip(names, q.cpu(), scale.cpu())):
            group = (firsts[i], s.awq_group, s.awq_bits) if awq else None
            out[n] = QTensor("int", qn.contiguous(), state[n].dtype, sn.contiguous(), bits, group)
    if s.lqer_top_k > 0:
        add_lqer(out, state, s.lqer_top_k, s.lqer_rank)
    return {name: out[name] for name in state}  # state-dict order


@torch.no_grad()
def quantization_error(state: dict, qstate: dict, hessians: dict) -> dict:
    """{role: (weight error, output error)} of the integer tensors, pooled by tensor_role: the relative
    Frobenius norm of W_q - W, and tr(E H E^T) / tr(W H W^T) with E = W_q - W and H the calibration Hessian,
    the share of the layers' squared output on the calibration inputs that quantization changes (what GPTQ
    minimises, and what the quantization tax follows). A setting that raises the tax shows here by role."""
    sums = {}
    for name, qt in qstate.items():
        if qt.kind != "int":
            continue
        W = state[name].detach().float()
        E = dequantize_int(qt).to(W.device) - W
        H = hessians[name].to(W.device, torch.float32)
        acc = sums.setdefault(tensor_role(name), torch.zeros(4, dtype=torch.float64, device=W.device))
        acc += torch.stack((E.square().sum(), W.square().sum(), ((E @ H) * E).sum(), ((W @ H) * W).sum())).double()
    return {role: (math.sqrt(a / b), c / d) for role, (a, b, c, d) in ((r, v.tolist()) for r, v in sums.items())}


def add_lqer(qstate: dict, state: dict, top_k: int, rank: int):
    """Give the top_k int tensors by Frobenius norm of their quantization error an LQER correction."""
    errors = {}
    for name, qt in qstate.items():
        if qt.kind == "int" and min(qt.data.shape) > rank:
            W = state[name].detach().float()
            errors[name] = W - dequantize_int(qt).to(W.device)
    for name in sorted(errors, key=lambda n: -float(errors[n].norm()))[:top_k]:
        qstate[name].lqer = lqer_factors(errors[name], rank)


# --- the artifact's size, estimated before training -----------------------------------------------------
# Once compressed, a grid value costs about the entropy of a Gaussian on its grid: step = clip * sigma / q_max,
# so log2(sqrt(2 pi e) * q_max / clip) bits. Measured on trained weights (brotli-11; the H200 240 s checkpoints
# and the 2aa73bf ablation artifact, 2026-12-04): int6 block matrices at 12.85 sigma take 3.36-3.37 bits
# (Gaussian: 3.32), the int8 embedding at 20 sigma 4.63 (Gaussian: 4.71; its rows are peakier). The offsets
# are those differences. Stream 0 (fp16 row scales and passthrough tensors, byte-shuffled) compressed to 0.63
# of its raw size there. The check refuses an overshoot beyond the estimate's error: ARTIFACT_ESTIMATE_MARGIN
# above the limit. The largest error measured is 1.4% (tests/test_quant.py); a 5% margin once let #1855's clip
# sigmas (EMBED_CLIP_SIGMAS=14, MLP_CLIP_SIGMAS=11.5) train, estimated 4.2% over, and fail when packed at
# 16,599,457 B (300 proxy steps on an H200, 2026-12-06: model bytes 0.45% under the estimate).
GRID_BITS_OFFSET = {"embed": -0.085, "block": 0.05}
STREAM0_RATIO = 0.63
# The other coders and ROW_ORDER=similarity, as the model bytes they gave on one H200 checkpoint over brotli's in
# matrix order (15,876,379 B; docs/artifact_frontier.md, 2026-12-04): zpaq 15,746,105, ans 15,794,488, lzma
# 16,437,631; row order with brotli 15,865,206, with zpaq 15,726,035. ans is order-0, so row order cannot move
# it; row order with lzma is unmeasured (1.0).
COMPRESSOR_SIZE_RATIO = {"brotli": 1.0, "lzma": 1.0354, "zpaq": 0.9918, "ans": 0.9948}
ROW_ORDER_SIZE_RATIO = {"brotli": 0.9993, "zpaq": 0.9987}
ARTIFACT_ESTIMATE_MARGIN = 0.025


def grid_value_bits(bits: int, clip_sigmas: float, role: str, tcq_step: float = 0.0) -> float:
    """Bits per grid value; with GPTQ_TCQ (tcq_step > 0) the symbols sit on a grid of 2 x tcq_step x the scalar
    step (the offsets are assumed to carry over: not yet measured on trained weights)."""
    q_max = 2 ** (bits - 1) - 1
    gaussian = math.log2(math.sqrt(2 * math.pi * math.e) * q_max / clip_sigmas)
    if tcq_step:
        gaussian -= math.log2(2 * tcq_step)
    return max(0.05, gaussian + GRID_BITS_OFFSET["embed" if role == "embed" else "block"])


def estimate_model_bytes(state: dict, hessian_names: set, s: Settings) -> int:
    """The artifact's model bytes for a state dict of this shape under these quantization settings, from the
    grid-value costs above (not from the weights' values): within 0.1% of the measured H200 artifact for the
    default and 1.4% for the role, mixed-bit, AWQ and LQER options (tests/test_quant.py). GPTQ_MIXED_BITS counts the
    high-bit fraction of the block matrices by number; LQER adds its int2 A and int4 B at full size; GPTQ_TCQ
    its column order at 2 bytes a column, once per Hessian. COMPRESSOR and ROW_ORDER scale it by their measured
    ratios to brotli."""
    stream0, grids = 0.0, 0.0
    mixed = mixed_bits(s)
    rows_of_ints, order_sources = [], set()
    for name, t in state.items():
        kind, bits, clip = quantization_plan(name, t, s, name in hessian_names)
        if kind != "int":
            stream0 += t.numel() * (2 if kind == "fp16" else t.element_size())
            continue
        rows, cols = t.shape
        role = tensor_role(name)
        widths = [(1.0, bits)]
        if mixed is not None and role != "embed":
            widths = [(s.gptq_mixed_high_frac, mixed[1]), (1 - s.gptq_mixed_high_frac, mixed[0])]
        for weight, width in widths:
            awq_cols = s.awq_group if awq_applies(s, width, cols) else 0
            awq_extra = math.log2((2 ** (s.awq_bits - 1) - 1) / (2 ** (width - 1) - 1)) if awq_cols else 0.0
            value_bits = grid_value_bits(width, clip, role, s.gptq_tcq_step if s.gptq_tcq else 0.0)
            grids += weight * rows * (cols * value_bits + awq_cols * awq_extra) / 8
        stream0 += 2 * rows  # the fp16 row scale
        if s.gptq_tcq and hessian_source(name) not in order_sources:  # one act-order per Hessian
            order_sources.add(hessian_source(name))
            grids += 2 * cols
        rows_of_ints.append((rows, cols))
    lqer = 0.0
    if s.lqer_top_k > 0:  # the largest tensors stand in for the top-k by error
        for rows, cols in sorted(rows_of_ints, key=lambda rc: -rc[0] * rc[1])[:s.lqer_top_k]:
            r = s.lqer_rank
            lqer += r * (rows * 2 + cols * 4) / 8 + 2 * (1 + r * -(-cols // LQER_B_GROUP))
    coder = COMPRESSOR_SIZE_RATIO[s.compressor]
    if s.row_order == "similarity":
        coder *= ROW_ORDER_SIZE_RATIO.get(s.compressor, 1.0)
    return int(coder * (grids + lqer + STREAM0_RATIO * stream0))


def estimate_model_bytes_of(model: nn.Module, s: Settings) -> int:
    """estimate_model_bytes for a built model (its weights may live on the meta device: only shapes are read);
    the matrices GPTQ calibrates are the ones collect_hessians hooks, and the tied embedding."""
    return estimate_model_bytes(model.state_dict(), set(quantized_linears(model)) | {"tok_emb.weight"}, s)


def check_artifact_estimate(model: nn.Module, s: Settings, rt: Runtime) -> int:
    """Before training: log the estimated artifact size, and refuse a configuration whose estimate is over
    ARTIFACT_LIMIT_BYTES by more than the estimate's margin (a model grown past the limit would otherwise
    train for 600 s and then fail when packed). Returns the estimated total."""
    model_bytes = estimate_model_bytes_of(model, s)
    code = code_bytes(s)
    total = model_bytes + code
    # field names unlike the artifact: line's, so that a search for "total:" or "code_bytes:" finds that one
    refused_above = int(s.artifact_limit_bytes * (1 + ARTIFACT_ESTIMATE_MARGIN))
    rt.log(f"artifact_estimate: model_bytes_est:{model_bytes} code_bytes_packed:{code} total_est:{total} "
           f"limit_bytes:{s.artifact_limit_bytes} refused_above:{refused_above}")
    if total > refused_above:
        raise UserError(f"the artifact is estimated at {total:,} bytes ({model_bytes:,} model + {code:,} code), "
                        f"over ARTIFACT_LIMIT_BYTES={s.artifact_limit_bytes:,} by more than the estimate's "
                        f"{ARTIFACT_ESTIMATE_MARGIN:.1%} margin: lower MATRIX_BITS/MLP_BITS/ATTN_BITS/EMBED_BITS, "
                        f"raise the *_CLIP_SIGMAS (a tighter clip costs bytes), or shrink the model before training")
    if total > s.artifact_limit_bytes:
        rt.log(f"WARNING: the artifact is estimated at {total:,} bytes, over ARTIFACT_LIMIT_BYTES="
               f"{s.artifact_limit_bytes:,} but within the estimate's {ARTIFACT_ESTIMATE_MARGIN:.1%} margin: the run "
               f"trains, and fails when packed if the real artifact is over too")
    return total


def dequantize_state(qstate: dict) -> dict:
    """{name: tensor} in each tensor's original dtype, ready for load_state_dict."""
    state = {}
    for name, qt in qstate.items():
        if qt.kind == "int" and not qt.extras():
            state[name] = (qt.data.float() * qt.scale.float()[:, None]).to(qt.dtype)
        elif qt.kind == "int":
            state[name] = dequantize_int(qt).to(qt.dtype)
        else:
            state[name] = qt.data.to(qt.dtype)
    return state


# --- the artifact: a tiny binary format ------------------------------------------------------------
# file  := magic "PGQA" | version u8 | compressor u8 | n u16 | n x u32 compressed stream lengths |
#          u32 CRC-32 of the streams | the n compressed streams, back to back (all little-endian)
# stream 0 (decompressed) := u32 header length | header (JSON: the model settings, and per tensor
#          [name, kind, dtype, shape, bits] + [extras] only when a tensor has any) | every fp16 array
#          (row scales of the quantized matrices, then per LQER tensor its A scale and B scales, fp16
#          passthrough tensors) concatenated in header order and byte-shuffled | raw tensors
# stream k >= 1 := [u16 row order, extras "rows"] | the grid values of the k-th quantized matrix, one
#          int8 per value, column-major (rows in that order) | [LQER A int8 row-major | B int8 row-major]
# extras := {"awq": [first column, columns, bits], "lqer": rank, "rows": 1, "tcq": fine step ratio, "tcq_states": n
#          (GPTQ_TCQ_STATES, only when not 8), "tcq_order_of": name}; a plain artifact has none, so
#          the defaults write byte for byte what they wrote before these options existed.
#
# Layout measurements (brotli-11 unless noted; tools/measure_packing.py re-runs them on any artifact;
# "tiny" = a trained MODEL_DIM=128 model, 150 steps, its own Hessians; "random" = N(0,1) weights):
#   * int6 values one per byte land within 1.2% (tiny) / 1.4% (random) of their order-0 entropy.
#     Bit-packing 4 values into 3 bytes is 14-15% larger, bit planes (low 3 | high 3 bits) 4.5-6%
#     larger, lzma -9e 3.5-5% larger. Two's complement, offset (+32) and zigzag codes differ < 0.01%.
#   * Column-major: row-major is 0.27% larger on tiny (486,845 vs 485,516 B), the same on random.
#     An input column's values share a magnitude.
#   * One stream per matrix instead of one stream: +0.06% on tiny, +774 B (0.005%) at full size, and
#     twice as fast even on one thread (random full size: 57 s vs 112 s on this 2-core box); exact
#     per-tensor sizes for the over-limit error; and parallel compression, since brotli releases
#     the GIL (two 1 MB streams: 1.68 s on one thread, 0.87 s on two).
#   * fp16 scales byte-shuffled: 8,104 vs 8,233 B plain (tiny).
#   * Whole artifact vs the reference container (torch.save + byte shuffle + one brotli stream):
#     485,516 vs 491,987 B on tiny; 15,924,787 vs 15,935,871 B on random full size (order-0 bound of
#     the grid values alone: 15,666,928 B).
#   * brotli quality 10 gives the same bytes as 11 on int6 streams; quality 9 is 13% larger; window
#     lgwin 16 is 0.07% larger and twice as fast. Defaults kept (quality 11, lgwin 22).

ARTIFACT_MAGIC = b"PGQA"
ARTIFACT_VERSION = 1
COMPRESSORS = ("brotli", "lzma", "zpaq", "ans")


def byte_shuffle(data: bytes, width: int) -> bytes:
    """Byte k of every width-byte word together, for k = 0..width-1: an fp16's high byte (sign,
    exponent) repeats far more than its low byte, so grouping them compresses better."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, width).T.tobytes()


def byte_unshuffle(data: bytes, width: int) -> bytes:
    return np.frombuffer(data, dtype=np.uint8).reshape(width, -1).T.tobytes()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)


def similarity_order(q: torch.Tensor) -> torch.Tensor:
    """A row order in which neighbours look alike (ROW_ORDER=similarity, PR #1855): a greedy chain from row 0,
    each step to the nearest unvisited row by L1 distance, so that the compressor's matches reach further."""
    rows = q.shape[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # all-pairs L1 of 8192 rows is ~35 GFLOP
    dist = torch.cdist(q.to(device).float()[None], q.to(device).float()[None], p=1)[0]
    dist.fill_diagonal_(float("inf"))
    order, current = [0], 0
    dist[:, 0] = float("inf")
    for _ in range(rows - 1):
        current = int(dist[current].argmin())
        order.append(current)
        dist[:, current] = float("inf")
    return torch.tensor(order, dtype=torch.int64)  # built on the host: the loop reads each step's argmin


def serialize_quantized(qstate: dict, settings: dict, row_order: str = "none") -> list:
    """The quantized state as uncompressed streams (see the format above)."""
    entries, fp16_parts, raw_parts, streams = [], [], [], []
    tcq_orders = []  # (name, order) of each trellis column order written so far
    for name, qt in qstate.items():
        entry = [name, qt.kind, str(qt.dtype).removeprefix("torch."), list(qt.data.shape), qt.bits]
        extras = qt.extras()
        if qt.kind == "int":
            grid, prefix = qt.data, b""
            if row_order == "similarity" and qt.data.shape[0] <= 65536:
                perm = similarity_order(qt.data)
                grid, prefix, extras["rows"] = qt.data[perm], tensor_bytes(perm.to(torch.int32).to(torch.uint16)), 1
            if qt.tcq is not None:  # the trellis' column order, 2 bytes a column, or the earlier tensor with it
                same = next((other for other, order in tcq_orders if torch.equal(order, qt.tcq[0])), None)
                if same is None:  # (c_q, c_k and c_v share one Hessian, so one act-order: written once)
                    prefix += tensor_bytes(qt.tcq[0].to(torch.int32).to(torch.uint16))
                    tcq_orders.append((name, qt.tcq[0]))
                else:
                    extras["tcq_order_of"] = same
            parts = [prefix, tensor_bytes(grid.T)]
            fp16_parts.append(tensor_bytes(qt.scale))
            if qt.lqer is not None:
                qa, a_scale, qb, b_scale = qt.lqer
                parts += [tensor_bytes(qa), tensor_bytes(qb)]
                fp16_parts += [tensor_bytes(a_scale), tensor_bytes(b_scale)]
            streams.append(b"".join(parts))
        elif qt.kind == "fp16":
            fp16_parts.append(tensor_bytes(qt.data))
        else:
            raw_parts.append(tensor_bytes(qt.data))
        entries.append(entry + [extras] if extras else entry)
    header = json.dumps({"settings": settings, "tensors": entries}, separators=(",", ":")).encode()
    first = struct.pack("<I", len(header)) + header + byte_shuffle(b"".join(fp16_parts), 2) + b"".join(raw_parts)
    return [first] + streams


def int_layout(shape, extras: dict) -> tuple:
    """(grid bytes, fp16 values, permutation bytes, LQER A bytes, LQER B bytes) of one int tensor; the
    permutation bytes are the row order (ROW_ORDER) and then the trellis' column order (GPTQ_TCQ)."""
    rows, cols = shape
    rank = extras.get("lqer", 0)
    groups = -(-cols // LQER_B_GROUP)
    perm = 2 * rows if extras.get("rows") else 0
    if "tcq" in extras and "tcq_order_of" not in extras:
        perm += 2 * cols
    return rows * cols, rows + (1 + rank * groups if rank else 0), perm, rows * rank, rank * cols


def tcq_states_of(extras: dict) -> int:
    states = extras.get("tcq_states", TCQ_STATES)
    if states not in TCQ_PARITY_CHECKS:
        raise ValueError(f"a trellis of {states} states is not one this train_gpt.py decodes")
    return states


def deserialize_quantized(streams: list):
    """Inverse of serialize_quantized: ({name: QTensor}, settings). Raises ValueError on any
    inconsistency between the header and the payloads."""
    first = streams[0]
    (n,) = struct.unpack_from("<I", first)
    header = json.loads(first[4:4 + n].decode())
    entries = [e if len(e) == 6 else [*e, {}] for e in header["tensors"]]
    dtypes = {name: getattr(torch, dtype) for name, _, dtype, *_ in entries}
    if not all(isinstance(d, torch.dtype) for d in dtypes.values()):
        raise ValueError("unknown dtype in the header")
    n_fp16 = sum(int_layout(shape, extras)[1] if kind == "int" else math.prod(shape)
                 for _, kind, _, shape, _, extras in entries if kind != "raw")
    raw_sizes = [math.prod(shape) * dtypes[name].itemsize for name, kind, _, shape, *_ in entries if kind == "raw"]
    int_count = sum(kind == "int" for _, kind, *_ in entries)
    pos = 4 + n
    if len(first) != pos + 2 * n_fp16 + sum(raw_sizes) or len(streams) != 1 + int_count:
        raise ValueError("payload sizes do not match the header")
    fp16 = tensor_from_bytes(byte_unshuffle(first[pos:pos + 2 * n_fp16], 2), torch.float16, (n_fp16,))
    pos += 2 * n_fp16
    qstate, f, k = {}, 0, 1
    for name, kind, _, shape, bits, extras in entries:
        if kind == "int":
            rows, cols = shape
            grid, n_half, n_perm, n_a, n_b = int_layout(shape, extras)
            data = streams[k]
            if len(data) != n_perm + grid + n_a + n_b:
                raise ValueError(f"stream {k} of {name} has {len(data)} bytes, not {n_perm + grid + n_a + n_b}")
            q = tensor_from_bytes(data[n_perm:n_perm + grid], torch.int8, (cols, rows)).T.contiguous()
            if extras.get("rows"):
                perm = tensor_from_bytes(data[:2 * rows], torch.uint16, (rows,)).to(torch.int64)
                q = q[torch.argsort(perm)]
            qt = QTensor("int", q, dtypes[name], fp16[f:f + rows].clone(), bits,
                         tuple(extras["awq"]) if "awq" in extras else None)
            if "tcq_order_of" in extras:
                source = qstate.get(extras["tcq_order_of"])
                if source is None or source.tcq is None or source.tcq[0].numel() != cols:
                    raise ValueError(f"{name} takes its trellis column order from {extras['tcq_order_of']!r}, "
                                     f"which is not an earlier trellis tensor of {cols} columns")
                qt.tcq = (source.tcq[0], float(extras["tcq"]), tcq_states_of(extras))
            elif "tcq" in extras:
                order = tensor_from_bytes(data[n_perm - 2 * cols:n_perm], torch.uint16, (cols,)).to(torch.int64)
                if not torch.equal(order.sort().values, torch.arange(cols)):
                    raise ValueError(f"the trellis column order of {name} is not a permutation")
                qt.tcq = (order, float(extras["tcq"]), tcq_states_of(extras))
            if "lqer" in extras:
                rank, a = extras["lqer"], n_perm + grid
                qa = tensor_from_bytes(data[a:a + n_a], torch.int8, (rows, rank))
                qb = tensor_from_bytes(data[a + n_a:], torch.int8, (rank, cols))
                b_scale = fp16[f + rows + 1:f + n_half].clone().reshape(rank, -1)
                qt.lqer = (qa, fp16[f + rows:f + rows + 1].clone(), qb, b_scale)
            qstate[name] = qt
            f, k = f + n_half, k + 1
        elif kind == "fp16":
            numel = math.prod(shape)
            qstate[name] = QTensor("fp16", fp16[f:f + numel].clone().reshape(shape), dtypes[name])
            f += numel
        elif kind == "raw":
            size = math.prod(shape) * dtypes[name].itemsize
            qstate[name] = QTensor("raw", tensor_from_bytes(first[pos:pos + size], dtypes[name], shape), dtypes[name])
            pos += size
        else:
            raise ValueError(f"unknown tensor kind {kind!r}")
    return qstate, header["settings"]


def optional_package(name: str, setting: str):
    """Import a package only the chosen option needs; its absence is a one-line error naming the fix."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{setting} needs the Python package {name}: pip install "
                        f"{COMPRESSOR_PACKAGES.get(setting.split('=')[-1], name)} "
                        f"(or choose another {setting.split('=')[0]})") from None


def ans_compress(data: bytes) -> bytes:
    """COMPRESSOR=ans: an order-0 ANS coder (constriction's rANS, Rust) over the bytes of one grid stream read as
    int8, with its own symbol frequencies: i8 first value | u16 span of values | u16 frequencies (scaled so the
    largest is 65535; a present value never rounds to 0) | u32 symbols | the coded u32 words. Grid values are
    close to i.i.d. within a matrix, where an order-0 coder reaches the entropy that brotli stays 1.2-1.6%
    above; a context on the previous row of the same column measured no better (0.02%, a CPU checkpoint)."""
    constriction = optional_package("constriction", "COMPRESSOR=ans")
    symbols = np.frombuffer(data, dtype=np.int8).astype(np.int32)
    first = int(symbols.min()) if len(symbols) else 0
    counts = np.bincount(symbols - first).astype(np.float64) if len(symbols) else np.ones(1)
    freqs = np.where(counts > 0, np.maximum(1, np.round(counts * 65535 / counts.max())), 0).astype(np.uint16)
    head = struct.pack("<bH", first, len(freqs)) + freqs.tobytes() + struct.pack("<I", len(symbols))
    if len(freqs) == 1:  # one value (or none): the header says it all
        return head
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols - first, ans_model(constriction, freqs))
    return head + coder.get_compressed().tobytes()


def ans_model(constriction, freqs: np.ndarray):
    # The decoder rebuilds the same float32 probabilities from the same frequencies: the same quantized model.
    return constriction.stream.model.Categorical((freqs / freqs.sum()).astype(np.float32), perfect=False)


def ans_decompress(blob: bytes) -> bytes:
    constriction = optional_package("constriction", "COMPRESSOR=ans")
    first, span = struct.unpack_from("<bH", blob)
    freqs = np.frombuffer(blob, dtype=np.uint16, count=span, offset=3).astype(np.float64)
    (n,) = struct.unpack_from("<I", blob, 3 + 2 * span)
    if span == 1:
        return np.full(n, first, dtype=np.int8).tobytes()
    words = np.frombuffer(blob[7 + 2 * span:], dtype=np.uint32).copy()
    symbols = constriction.stream.stack.AnsCoder(words).decode(ans_model(constriction, freqs), n)
    return (symbols + first).astype(np.int8).tobytes()


# zpaq level 5 is a context-mixing coder: decoding costs what encoding does, about 2.2 s a MB on one thread of
# this project's 2-core CPU box. Each block of a zpaq stream decodes on its own thread, so one 4 MiB stream (the
# int8 embedding) in one block took 9-11 s here, and ~13 s on the GPU machine's 16 cores while the other streams
# were long done. ZPAQ_BLOCK_BYTES cuts every stream into blocks of at most 1 MiB, each compressed alone (one
# thread: the bytes do not depend on the machine) and concatenated: a multi-block zpaq archive, which
# zpaq.decompress splits over threads by itself. Each extra block costs about 1.3 KB (a 4 MiB stream: +4.1 KB
# for 4 blocks), and the 512 x 2048 MLP matrices stay one block.
ZPAQ_BLOCK_BYTES = 1 << 20


def zpaq_compress(data: bytes) -> bytes:
    zpaq = optional_package("zpaq", "COMPRESSOR=zpaq")
    blocks = [data[i:i + ZPAQ_BLOCK_BYTES] for i in range(0, len(data), ZPAQ_BLOCK_BYTES)] or [data]
    with ThreadPoolExecutor(max_workers=len(blocks)) as pool:  # zpaq releases the GIL
        return b"".join(pool.map(lambda block: zpaq.compress(block, level=5, threads=1), blocks))


def compress(data: bytes, kind: str) -> bytes:
    if kind == "ans":
        return ans_compress(data)
    if kind == "brotli":
        import brotli
        return brotli.compress(data, quality=11)
    if kind == "zpaq":
        return zpaq_compress(data)
    return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=9 | lzma.PRESET_EXTREME)


def decompress(data: bytes, kind: str) -> bytes:
    if kind == "ans":
        return ans_decompress(data)
    if kind == "brotli":
        import brotli
        return brotli.decompress(data)
    if kind == "zpaq":
        return optional_package("zpaq", "COMPRESSOR=zpaq").decompress(data)
    return lzma.decompress(data, format=lzma.FORMAT_ALONE)


# The optional compressors' packages, as pip should install them: zpaq before 0.3 has another API (no threads).
COMPRESSOR_PACKAGES = {"zpaq": "'zpaq>=0.3.7'", "ans": "'constriction>=0.5'"}


@functools.lru_cache(maxsize=None)
def check_compressor(kind: str):
    """Round-trip a few bytes at start-up: a missing or incompatible optional package fails before training,
    not when the artifact is packed after 600 s (zpaq 0.0.x installs fine and then rejects threads=)."""
    probe = bytes(range(256)) * 2
    try:
        ok = decompress(compress(probe, kind), kind) == probe
    except UserError:
        raise
    except Exception as e:  # an incompatible version: its own error, first line only
        raise UserError(f"COMPRESSOR={kind}: the installed package failed a test round trip ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); pip install -U "
                        f"{COMPRESSOR_PACKAGES.get(kind, kind)}") from None
    if not ok:
        raise UserError(f"COMPRESSOR={kind}: a test round trip returned other bytes; pip install -U "
                        f"{COMPRESSOR_PACKAGES.get(kind, kind)}")


def stream_compressor(compressor: str, index: int) -> str:
    """Stream 0 (JSON header, fp16 scales) is no grid: an order-0 coder would not do, brotli does it for ans."""
    return "brotli" if compressor == "ans" and index == 0 else compressor


def pack_artifact(streams: list, compressor: str, threads: int) -> tuple:
    """(artifact bytes, compressed size of each stream). Streams compress independently, largest
    first, on a thread pool (brotli and lzma release the GIL while they work)."""
    order = sorted(range(len(streams)), key=lambda i: -len(streams[i]))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        done = dict(zip(order, pool.map(lambda i: compress(streams[i], stream_compressor(compressor, i)), order)))
    parts = [done[i] for i in range(len(streams))]
    body = b"".join(parts)
    head = ARTIFACT_MAGIC + struct.pack(f"<BBH{len(parts)}II", ARTIFACT_VERSION, COMPRESSORS.index(compressor),
                                        len(parts), *map(len, parts), zlib.crc32(body))
    return head + body, [len(p) for p in parts]


def unpack_artifact(blob: bytes, label: str):
    """({name: QTensor}, stored settings) from artifact bytes; every defect is a one-line UserError."""
    fix = "re-create it with a training run (or copy it again), or point EVAL_ONLY at another artifact"
    if len(blob) < 8 or blob[:4] != ARTIFACT_MAGIC:
        raise UserError(f"artifact {label} does not start with {ARTIFACT_MAGIC!r} (got {blob[:4]!r}): "
                        f"not a train_gpt.py artifact; {fix}")
    version, comp, n = struct.unpack_from("<BBH", blob, 4)
    if version != ARTIFACT_VERSION:
        raise UserError(f"artifact {label} has format version {version}, this train_gpt.py reads version "
                        f"{ARTIFACT_VERSION}: evaluate it with the train_gpt.py that wrote it")
    head = 8 + 4 * n + 4
    if comp >= len(COMPRESSORS) or len(blob) < head:
        raise UserError(f"artifact {label} has a corrupt or truncated header ({len(blob)} bytes): {fix}")
    *lengths, crc = struct.unpack_from(f"<{n}II", blob, 8)
    if len(blob) != head + sum(lengths):
        raise UserError(f"artifact {label} is {len(blob)} bytes but its header promises {head + sum(lengths)}: "
                        f"truncated or padded; {fix}")
    if zlib.crc32(blob[head:]) != crc:
        raise UserError(f"artifact {label} fails its CRC-32 check: corrupt; {fix}")
    try:
        offsets = np.cumsum([head] + lengths).tolist()
        # Streams decode independently, in parallel: brotli, lzma and zpaq release the GIL (zpaq decodes at
        # about 2.2 s a MB on one thread, so one thread would spend ~70 s on a full-size artifact).
        with ThreadPoolExecutor(max_workers=min(32, len(os.sched_getaffinity(0)))) as pool:
            streams = list(pool.map(lambda i: decompress(blob[offsets[i]:offsets[i + 1]],
                                                         stream_compressor(COMPRESSORS[comp], i)),
                                    range(len(lengths))))
        return deserialize_quantized(streams)
    except UserError:
        raise
    except Exception as e:  # decompressor errors, bad JSON, sizes that disagree with the header
        raise UserError(f"artifact {label} passes its checksum but does not decode ({type(e).__name__}: {e}): "
                        f"{fix}") from None


def read_artifact(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist: check the path (training runs write ARTIFACT_PATH, "
                        f"default LOG_DIR/<RUN_ID>.ptz)")
    blob = path.read_bytes()
    return (*unpack_artifact(blob, str(path)), len(blob))


def write_atomic(path: Path, data: bytes):
    """Write to a temporary name beside path, then rename: readers never see a half-written file, and a
    failed write (a full disk) leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror}): it needs {len(data) / 1e6:.1f} MB; free that much "
                        f"space on its disk or point the path at another one") from None


# --- the shipped script ----------------------------------------------------------------------------
# The counted train_gpt.py of a submission is a two-line stub that decompresses this source, less its
# comments, docstrings and blank lines (shipping_source: the same program, a third fewer compressed
# bytes), and runs it. Brotli-11 is ~5% smaller than lzma -9e; the compressed bytes sit in a latin-1
# string literal (only NUL, CR, backslash and quote are escaped: ~2% overhead) instead of base85
# (25%). The stub puts the shipped lines into linecache under the stub's own path and uses the
# Python traceback printer, so tracebacks, inspect.getsource and running_source() see that code;
# __file__ and __name__ are the stub's, as for the readable file.

STUB_HEAD = b"#coding:l1\nimport brotli,linecache as l,sys,traceback as t;s=brotli.decompress('''"
STUB_TAIL = (b"'''.encode('l1')).decode();l.cache[__file__]=(len(s),None,s.splitlines(1),__file__);"
             b"sys.excepthook=t.print_exception;exec(compile(s,__file__,'exec'))\n")
STUB_ESCAPES = {0: b"\\0", 13: b"\\r", 92: b"\\\\", 39: b"\\'"}


def docstring_nodes(tree: ast.AST) -> list:
    """(owner, docstring Expr) for every module, class and function body that opens with a string literal."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.append((node, first))
    return found


def shipping_source(source: str) -> str:
    """The source without comments, docstrings and blank lines: the code the shipped stub carries. The same
    program (tests compare its AST with the source's less the docstrings); a body that was only a
    docstring becomes `pass`; text inside other string literals is never touched. Idempotent."""
    import io
    import tokenize
    lines = source.splitlines(keepends=True)
    drop, keep_text, cut = set(), set(), {}
    for owner, doc in docstring_nodes(ast.parse(source)):
        before = lines[doc.lineno - 1][:doc.col_offset]
        after = lines[doc.end_lineno - 1].encode("utf-8")[doc.end_col_offset:].decode("utf-8").strip()
        if before.strip() or (after and not after.startswith("#")):
            continue  # shares its line with other code: left as it is
        drop.update(range(doc.lineno, doc.end_lineno + 1))
        if len(owner.body) == 1:
            lines[doc.lineno - 1] = before + "pass\n"
            drop.discard(doc.lineno)
            keep_text.add(doc.lineno)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            cut[tok.start[0]] = tok.start[1]  # column of a comment, which runs to the end of its line
        elif tok.start[0] < tok.end[0] and tok.type not in (tokenize.NL, tokenize.NEWLINE):
            keep_text.update(range(tok.start[0], tok.end[0]))  # lines that end inside a multi-line string
    out = []
    for number, line in enumerate(lines, start=1):
        if number in drop:
            continue
        if number in keep_text:
            out.append(line)
            continue
        if number in cut:
            line = line[:cut[number]]
        line = line.rstrip()
        if line:
            out.append(line + "\n")
    return "".join(out)


def pack_script(source: str) -> bytes:
    """The self-extracting shipped form of a Python source (what tools/pack_submission.py writes): its
    shipping_source in the stub."""
    return stub_for(shipping_source(source))


def stub_for(text: str) -> bytes:
    """The two-line stub that runs `text`: brotli-11 bytes in an escaped latin-1 string literal."""
    import brotli
    data = brotli.compress(text.encode("utf-8"), quality=11)
    out = bytearray()
    for i, byte in enumerate(data):
        if byte == 0 and i + 1 < len(data) and data[i + 1] in b"01234567":
            out += b"\\x00"  # "\0" followed by an octal digit would read as a longer octal escape
        else:
            out += STUB_ESCAPES.get(byte, bytes((byte,)))
    return STUB_HEAD + bytes(out) + STUB_TAIL


def running_source() -> str:
    """The readable source of this script: the file itself, or the text a packed stub registered."""
    lines = linecache.getlines(__file__)
    if not lines:
        raise UserError(f"cannot read the source of {__file__} to count its packed size: set CODE_BYTES_FROM=file")
    return "".join(lines)


def code_bytes(s: Settings) -> int:
    if s.code_bytes_from == "file":
        return Path(__file__).stat().st_size
    return packed_source_bytes()


@functools.lru_cache(maxsize=None)
def packed_source_bytes() -> int:
    """Packing takes ~0.5 s; the source does not change during a run (start-up estimate and final count)."""
    return len(pack_script(running_source()))


def settings_with_role(s: Settings, *roles) -> dict:
    return {x.name: getattr(s, x.name.lower()) for x in SETTINGS if x.role in roles}


def artifact_setting_names() -> list:
    """Settings the artifact carries: what shapes the model, and what the evaluation score depends on."""
    return [x.name for x in SETTINGS if x.role in ("model", "score")]


def adopt_artifact_settings(s: Settings, stored: dict, environ) -> tuple:
    """(settings, notes): EVAL_ONLY rebuilds the run from the artifact alone. A model setting follows the
    artifact, and one set explicitly to another value is an error (the artifact holds no such model). A
    score setting (evaluation windows, TTT) follows the artifact unless set explicitly, which then wins;
    every adopted or overridden value is noted for the log. Data and tokenizer paths are not stored:
    they are machine-specific."""
    s, notes = copy.copy(s), []
    for name, value in stored.items():
        setting = SETTINGS_BY_NAME.get(name)
        if setting is None or not setting.role or getattr(s, name.lower()) == value:
            continue
        explicit = bool(environ.get(name))
        if explicit and setting.role == "model":
            raise UserError(f"{name}={environ[name]} but the artifact {s.eval_only} was trained with {name}={value}: "
                            f"unset {name} (the artifact's value is then used) or set it to {value}")
        if explicit:
            notes.append(f"eval_only:overridden setting:{name} value:{getattr(s, name.lower())} artifact:{value}")
            continue
        notes.append(f"eval_only:adopted setting:{name} value:{value} default:{getattr(s, name.lower())}")
        setattr(s, name.lower(), value)
    return s, notes


def model_from_artifact(qstate: dict, s: Settings, rt: Runtime, label: str, bos_id: int = 1) -> GPT:
    """A fresh GPT built from s with the dequantized weights, on the device, looping on."""
    model = GPT(s)
    try:
        model.load_state_dict(dequantize_state(qstate), strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"artifact {label} does not fit the model this train_gpt.py builds ({detail}): "
                        f"evaluate it with the train_gpt.py that wrote it") from None
    model.to(rt.device)
    model.use_attention(s.attn_backend, rt.device, bos_id)
    model.looping = s.num_loops > 0
    return model


def build_artifact(model: GPT, hessians: dict, s: Settings, rt: Runtime) -> tuple:
    """GPTQ, serialization and compression: (artifact bytes, {part: compressed bytes})."""
    with timed(rt) as gptq:
        qstate = quantize_model(model.state_dict(), hessians, s)
    kinds = {}
    for qt in qstate.values():
        key = f"int{qt.bits}" if qt.kind == "int" else qt.kind
        kinds[key] = kinds.get(key, 0) + 1
    fp16_bytes = sum(2 * qt.data.numel() for qt in qstate.values() if qt.kind == "fp16")
    rt.log(f"gptq:quantize seconds:{gptq.seconds:.1f} tensors:" + ",".join(f"{k}x{v}" for k, v in sorted(kinds.items()))
           + f" passthrough_fp16_bytes:{fp16_bytes}"
           + (f" tcq_step:{s.gptq_tcq_step} tcq_states:{s.gptq_tcq_states}" if s.gptq_tcq else ""))
    errors = quantization_error(model.state_dict(), qstate, hessians)
    rt.log("gptq:error " + " ".join(f"{role}:weight_rel={w:.5f},output_rel={o:.6f}" for role, (w, o) in errors.items()))
    threads = min(32, len(os.sched_getaffinity(0)))
    with timed(rt) as packing:
        streams = serialize_quantized(qstate, {n: getattr(s, n.lower()) for n in artifact_setting_names()},
                                      s.row_order)
        blob, sizes = pack_artifact(streams, s.compressor, threads)
    raw = sum(map(len, streams))
    rt.log(f"serialize: raw_bytes:{raw} compressed_bytes:{len(blob)} ratio:{raw / len(blob):.3f} "
           f"seconds:{packing.seconds:.1f} compressor:{s.compressor} streams:{len(streams)} threads:{threads}")
    parts = {"header+small tensors": sizes[0]}
    parts.update(zip([n for n, qt in qstate.items() if qt.kind == "int"], sizes[1:]))
    by_bits = {}
    for name, size in parts.items():
        key = f"int{qstate[name].bits}" if name in qstate else "header+small"
        by_bits[key] = by_bits.get(key, 0) + size
    rt.log("serialize:breakdown " + " ".join(f"{k}:{v}" for k, v in sorted(by_bits.items())))
    return blob, parts


def artifact_accounting(model_bytes: int, code: int, limit: int) -> dict:
    """The challenge's count: compressed model bytes + bytes of the shipped train_gpt.py."""
    total = model_bytes + code
    return {"model_bytes": model_bytes, "code_bytes": code, "artifact_bytes": total, "margin": limit - total}


# =================================================================================================
# EVALUATION: bits per byte, sliding window, legal score-first TTT, the eval budget
# =================================================================================================
# bpb = total NLL in bits / total UTF-8 bytes of the scored text. A target's bytes are the UTF-8
# length of its piece without the leading "▁", plus one for that "▁" unless the previous token is a
# control/boundary token (the space is not text right after BOS). Byte-fallback pieces are one byte;
# control, unknown and unused pieces are zero. Sums are float64 and added up across ranks.
#
# Every pass scores each target of the validation stream exactly once and keeps the four conditions
# of issue #1017: a target's distribution depends only on the tokens before it and on weights trained
# on targets scored earlier (TTT scores a chunk before it trains on it); it is a full softmax; each
# target is scored once, in one left-to-right pass. Nothing here ever trains on unscored tokens.


@dataclass
class ByteTables:
    base_bytes: torch.Tensor       # int32 [V]
    has_leading_space: torch.Tensor  # bool [V]
    is_boundary: torch.Tensor      # bool [V]

    def to(self, device):
        return ByteTables(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))

    def count(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Bytes of the text each target adds, given the token before it ([...] int64 tensors)."""
        space = self.has_leading_space[targets] & ~self.is_boundary[inputs]
        return self.base_bytes[targets] + space.to(torch.int32)


def build_byte_tables(sp, vocab_size: int) -> ByteTables:
    size = max(sp.vocab_size(), vocab_size)
    base = np.zeros(size, dtype=np.int32)
    space = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)  # ids beyond the tokenizer behave like control tokens
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


FULL_VAL_TARGETS = 40_540_160  # scored targets of the official SP8192 validation at EVAL_SEQ_LEN 2048
BUDGET_GPUS = 8                # the eval budget is 600 s on 8xH100


def check_byte_tables(sp, tables: ByteTables, val_tokens: torch.Tensor, max_docs: int, bos_id: int) -> str:
    """Cross-check the tables against decoded text and stop if they disagree; returns the log line.

    Decodes up to max_docs whole validation documents (split at BOS) and compares the UTF-8 length of
    the text with the tables' count for the same targets. The trap (issue #897): a tokenizer without a
    standalone "▁" piece spells a lone space as the byte pieces E2 96 81, which the tables count as 3
    bytes for 1 byte of text, so bpb comes out ~20% low. SentencePiece decodes those bytes to a literal
    "▁" rather than a space, hence the replace before counting."""
    tokens = val_tokens.cpu()
    bos = torch.nonzero(tokens == bos_id).flatten()[:max_docs + 1].tolist() if bos_id >= 0 else []
    if len(bos) < 2:
        return "byte_check: status:skipped reason:no_whole_bos_delimited_document"
    tables = tables.to("cpu")
    table_bytes = text_bytes = bad_docs = 0
    for start, end in zip(bos[:-1], bos[1:]):
        # the last target is the next document's BOS: 0 bytes
        counted = int(tables.count(tokens[start:end], tokens[start + 1:end + 1]).sum())
        decoded = len(sp.decode(tokens[start + 1:end].tolist()).replace("\u2581", " ").encode("utf-8"))
        table_bytes, text_bytes, bad_docs = table_bytes + counted, text_bytes + decoded, bad_docs + (counted != decoded)
    line = (f"byte_check: docs:{len(bos) - 1} table_bytes:{table_bytes} decoded_bytes:{text_bytes} "
            f"mismatched_docs:{bad_docs}")
    if abs(table_bytes - text_bytes) > 1e-4 * text_bytes:
        raise UserError(f"{line}: the byte tables do not match the decoded validation text, so val_bpb would be wrong "
                        f"(a tokenizer without a standalone \u2581 piece over-counts spaces, issue #897): use the "
                        "challenge "
                        f"tokenizer or one that has \u2581 as a normal piece")
    return line + " status:ok"


def validate_eval_settings(s: Settings):
    """Cross-field checks of the evaluation settings (single-value ranges are declared in SETTINGS)."""
    need(s.eval_stride <= s.eval_seq_len, f"EVAL_STRIDE={s.eval_stride} must be in 1..EVAL_SEQ_LEN={s.eval_seq_len}")
    need(not (s.val_docs and s.val_tokens_expected),
         f"VAL_DOCS={s.val_docs} scores a prefix, so VAL_TOKENS_EXPECTED={s.val_tokens_expected} (the whole split's "
         "count) cannot hold: set one of them to 0")
    need(s.ttt_chunk_tokens >= s.eval_seq_len,
         f"TTT_CHUNK_TOKENS={s.ttt_chunk_tokens} must hold at least one EVAL_SEQ_LEN={s.eval_seq_len} training "
         "sequence")
    need(s.ttt_chunk_size <= s.eval_seq_len, f"TTT_CHUNK_SIZE={s.ttt_chunk_size} must be in "
                                             f"1..EVAL_SEQ_LEN={s.eval_seq_len}")
    need(s.ttt_freeze_blocks <= s.num_layers, f"TTT_FREEZE_BLOCKS={s.ttt_freeze_blocks} must be in 0..NUM_LAYERS")
    need(s.ttt_phases == 0 or s.ttt_mode == "lora", f"TTT_PHASES={s.ttt_phases} adds global SGD phases to the "
                                                   "per-document LoRA TTT: set TTT_MODE=lora or TTT_PHASES=0")
    need(s.ttt_phases <= s.ttt_phase_prefix_docs, f"TTT_PHASES={s.ttt_phases} needs a document per phase: raise "
                                                  f"TTT_PHASE_PREFIX_DOCS={s.ttt_phase_prefix_docs} or lower TTT_PHASES")
    lora_targets(s)
    need(s.ttt_short_doc_tokens == 0 or s.ttt_short_doc_chunk_size <= s.ttt_chunk_size,
         f"TTT_SHORT_DOC_CHUNK_SIZE={s.ttt_short_doc_chunk_size} must be at most TTT_CHUNK_SIZE={s.ttt_chunk_size} "
         "(short documents take the smaller chunk), or set TTT_SHORT_DOC_TOKENS=0")
    need(not s.ngram_tilt or s.sliding_window_enabled or s.ttt_enabled,
         "NGRAM_TILT=1 tilts the sliding-window and TTT passes, but both are off: set SLIDING_WINDOW_ENABLED=1 or "
         "TTT_ENABLED=1, or NGRAM_TILT=0")


LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")  # the outputs LoRA TTT can adapt, in layout order


def lora_targets(s) -> tuple:
    """TTT_LORA_TARGETS as a tuple in the order of LORA_TARGETS."""
    names = [t for t in s.ttt_lora_targets.replace(" ", "").split(",") if t]
    need(names and len(set(names)) == len(names) and set(names) <= set(LORA_TARGETS),
         f"TTT_LORA_TARGETS={s.ttt_lora_targets!r} must be a comma list of distinct names among "
         f"{','.join(LORA_TARGETS)}, e.g. k,o,mlp,head")
    return tuple(t for t in LORA_TARGETS if t in names)


@dataclass
class EvalData:
    """What every evaluation pass reads: the tokenizer, the byte tables and the validation stream.
    Loading it never touches a training shard, so EVAL_ONLY needs only these files."""
    sp: object
    tables: ByteTables
    val_tokens: torch.Tensor

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()


def load_eval_data(s: Settings, rt: Runtime) -> EvalData:
    sp = load_tokenizer(s.tokenizer_path, s.vocab_size)
    need(not s.val_docs or sp.bos_id() >= 0,
         f"VAL_DOCS={s.val_docs} finds documents by their BOS token, but the tokenizer {s.tokenizer_path} has none: "
         "set VAL_DOCS=0")
    return EvalData(sp, build_byte_tables(sp, s.vocab_size).to(rt.device),
                    load_validation_tokens(s.data_path, s.eval_seq_len, s.vocab_size, s.val_docs, sp.bos_id()))


def check_evaluation_setup(s: Settings, rt: Runtime, data: EvalData) -> None:
    """Start-up checks of everything the evaluation relies on, before any training time is spent."""
    n = len(data.val_tokens) - 1
    if s.val_tokens_expected and n != s.val_tokens_expected:
        raise UserError(f"validation has {n} scored targets but VAL_TOKENS_EXPECTED={s.val_tokens_expected}: a "
                        "fineweb_val_* "
                        f"shard is missing or truncated (re-download it), or EVAL_SEQ_LEN changed the count")
    if s.val_docs:
        rt.log(f"WARNING: VAL_DOCS={s.val_docs} scores the first {s.val_docs} validation documents ({n} targets), "
               "not the whole split: a comparison on a fixed prefix, never a challenge score")
    if s.byte_check_docs > 0:
        rt.log(check_byte_tables(data.sp, data.tables, data.val_tokens, s.byte_check_docs, data.bos_id))
    need(not s.doc_mask or data.bos_id >= 0,
         f"DOC_MASK=1 finds documents by their BOS token, but the tokenizer {s.tokenizer_path} has none: set DOC_MASK=0")


class Scores:
    """float64 sums (NLL, targets, bytes) of one pass on one rank, and the score-first guard.

    The guard is on in every run: a host-side map of the stream's targets (one byte each, no device
    work, no sync) that the pass marks as it scores and that every TTT step checks before it trains
    (require_range). With record=N+1 the object also keeps every target's loss and how often it was
    scored on the device: the legality tests read them, and the guard then also checks those counts."""

    def __init__(self, device, record: int = 0, n_targets: int = 0):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.loss = torch.full((record,), math.nan, dtype=torch.float64, device=device) if record else None
        self.hits = torch.zeros(record, dtype=torch.int32, device=device) if record else None
        self.scored = np.zeros(max(record, n_targets + 1), dtype=bool)
        self.guard_checks = 0

    def mark(self, first: int, last: int):
        """Targets first..last (stream indices, inclusive) are scored."""
        self.scored[first:last + 1] = True

    def require_range(self, first: int, last: int):
        """The score-first guard: a TTT step may only train on targets first..last if all are scored."""
        self.guard_checks += 1
        if last >= first and not self.scored[first:last + 1].all():
            raise RuntimeError(f"score-first violated: TTT is about to train on targets {first}..{last}, "
                               f"not all of which are scored yet")

    def add(self, nll, prev, target, position, mask, tables: ByteTables):
        """All [B, K]: NLL, the input token before each target, the target, its index in the stream, scored-or-not."""
        nll = torch.where(mask, nll.detach().double(), 0.0)
        nbytes = torch.where(mask, tables.count(prev, target), 0).double()
        self.sums += torch.stack((nll.sum(), mask.sum().double(), nbytes.sum()))
        if self.hits is not None:
            where = position[mask]
            self.loss[where] = nll[mask]
            self.hits.index_add_(0, where, torch.ones_like(where, dtype=torch.int32))

    def result(self, rt: Runtime, seconds: float, record: bool) -> "EvalResult":
        """The pass's figures summed over ranks: bpb = loss x targets / (ln 2 x bytes)."""
        sums = rt.all_reduce(self.sums.clone()).tolist()
        loss = sums[0] / sums[1]
        return EvalResult(loss, loss / math.log(2) * sums[1] / sums[2], int(sums[1]), seconds, self if record else None,
                          scored_bytes=int(sums[2]))


@dataclass
class EvalResult:
    loss: float
    bpb: float
    targets: int
    seconds: float
    scores: Scores | None = None  # kept when recording (tests)
    estimated_8gpu_seconds: float = math.nan  # set by run_evaluation_passes
    scored_bytes: int = 0

    def log_line(self, label: str) -> str:
        """The pass's result as logged; a reader can check bpb = val_loss x scored_targets / (ln 2 x scored_bytes)."""
        return (f"{label} val_loss:{self.loss:.8f} val_bpb:{self.bpb:.8f} eval_time:{1000 * self.seconds:.0f}ms "
                f"scored_targets:{self.targets} scored_bytes:{self.scored_bytes}")


def share(n: int, rank: int, world_size: int) -> tuple:
    """Rank's contiguous slice [lo, hi) of n items."""
    return n * rank // world_size, n * (rank + 1) // world_size


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """Host array to device without waiting for the queued GPU work (pinned, asynchronous copy)."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def val_batch_seqs(s: Settings, rt: Runtime) -> int:
    """Windows per forward pass on each rank of the non-overlapping evaluation: VAL_BATCH_TOKENS is global,
    split as 8 GPUs' micro-batches would be (whatever GRAD_ACCUM_STEPS, which is a training setting)."""
    return max(1, s.val_batch_tokens // (max(8, rt.world_size) * s.eval_seq_len))


def allow_recompiles(limit: int = 32):
    """Eval compiles a few shapes (sliding tail, first window, TTT steps) for several models: let dynamo keep them."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


# --- the n-gram tilt's hints (NGRAM_TILT, PR #1514/#2135) -------------------------------------------
# A token-only n-gram: target t (tokens[t], predicted from tokens[:t]) gets a hint when its context, the
# NGRAM_TILT_ORDER tokens tokens[t-order:t], occurred before in the stream. The hint is the token that
# followed the context's most recent earlier occurrence, kept when it followed the context at least
# NGRAM_TILT_MIN_COUNT times and in at least NGRAM_TILT_THRESHOLD of its earlier occurrences. The hint
# never reads the target: hints[t] is a function of tokens[:t] alone (tests/test_ngram_tilt.py changes
# tokens[t:] and checks it). GPT.token_losses adds NGRAM_TILT_BETA to the hinted logit (ngram_tilt) and
# the cross-entropy renormalises over the full vocabulary.
#
# The prefix is the validation stream itself. The statistics behind hints[t] are the targets 1..t-1 and
# their contexts: what one left-to-right pass has scored before t. Each target enters them only after
# its own hint is taken, and is scored once, with its own hint. Every rank computes the same hints for
# the whole stream before its pass (as the records did), so a target's tilted score does not depend on
# which rank scores it, in which order, or on how many ranks there are: the tilted scores are the same
# on 1 or 8 GPUs, and the same target has the same hint in every pass.


def dense_ids(keys: torch.Tensor) -> torch.Tensor:
    """keys renumbered 0..(distinct - 1), equal where the keys are equal."""
    return torch.unique(keys, return_inverse=True)[1]


def context_ids(tokens: torch.Tensor, order: int) -> torch.Tensor:
    """ids[j], j = 0..len(tokens) - order: equal exactly when the spans tokens[j:j + order] are equal.
    Exact, with no hashing: ids of spans of `length` tokens pair up into ids of longer spans (the span at j
    with the one at j + step), doubling the length until it reaches order."""
    ids, length = dense_ids(tokens.long()), 1
    while length < order:
        step = min(length, order - length)
        ids = dense_ids(ids[:-step] * (int(ids.max()) + 1) + ids[step:])  # < (stream length)^2: fits int64
        length += step
    return ids


def earlier_same(keys: torch.Tensor) -> tuple:
    """(previous, count) for every i: the last j < i with keys[j] == keys[i] (-1 if none), and how many
    such j there are. A stable sort keeps each key's positions in stream order."""
    order = torch.sort(keys, stable=True)[1]
    ranked = keys[order]
    i = torch.arange(len(keys), device=keys.device)
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[1:] = ranked[1:] != ranked[:-1]
    group_start = torch.cummax(torch.where(starts, i, 0), 0).values
    previous, count = torch.empty_like(order), torch.empty_like(order)
    previous[order] = torch.where(starts, -1, order.roll(1))
    count[order] = i - group_start
    return previous, count


@torch.no_grad()
def ngram_hints(tokens: torch.Tensor, order: int, min_count: int, threshold: float) -> torch.Tensor:
    """hints [N + 1] (int32, -1 = none) for the N targets of the stream tokens [N + 1] (hints[0] = -1):
    hints[t] is the token that followed the most recent earlier occurrence of tokens[t-order:t], if it
    followed that context at least min_count times before t and in at least `threshold` of the context's
    occurrences before t. Sorts over the stream, no per-token loop; the same on CPU and GPU."""
    tokens = tokens.long()
    n = len(tokens) - 1
    hints = torch.full((n + 1,), -1, dtype=torch.int32, device=tokens.device)
    if n <= order:
        return hints
    context = context_ids(tokens[:n], order)  # context[j]: tokens[j:j + order], the context of target j + order
    follower = tokens[order:]                 # follower[j]: that target
    previous, seen = earlier_same(context)
    _, pair_seen = earlier_same(context * (int(follower.max()) + 1) + follower)
    last = previous.clamp_min(0)
    follows = pair_seen[last] + 1  # times the last follower came after this context before t (counting `last`)
    keep = (previous >= 0) & (follows >= min_count) & (follows >= threshold * seen)
    hints[order:] = torch.where(keep, follower[last], -1)
    return hints


def hint_args(hints, positions) -> tuple:
    """The extra loss_fn argument for targets at stream positions: their hints when NGRAM_TILT is on."""
    return () if hints is None else (hints[positions],)


def prepare_ngram_hints(s: Settings, rt: Runtime, val_tokens, budget=None):
    """The hints of the whole stream for the tilted passes (None with NGRAM_TILT=0), with the log line
    that states the protocol. The hinted share and the share of hints equal to their target are read
    after the fact for the log only."""
    if not s.ngram_tilt:
        return None
    t0 = time.perf_counter()
    tokens = val_tokens.to(rt.device)
    hints = ngram_hints(tokens, s.ngram_tilt_order, s.ngram_tilt_min_count, s.ngram_tilt_threshold)
    hinted = hints[1:] >= 0
    n_hinted = int(hinted.sum())
    agree = int((hints[1:] == tokens[1:].long()).sum())
    seconds = time.perf_counter() - t0
    rt.log(f"ngram_tilt: prefix:stream statistics:targets_before_t context:order_{s.ngram_tilt_order}_tokens "
           f"feature:indicator beta:{s.ngram_tilt_beta} min_count:{s.ngram_tilt_min_count} "
           f"threshold:{s.ngram_tilt_threshold} normalised:full_vocab_softmax passes:sliding,ttt ttt_trains_on:tilted "
           f"ranks:same_hints hinted:{n_hinted / max(len(hinted), 1):.4f} "
           f"diagnostic_hint_equals_target:{agree / max(n_hinted, 1):.4f} seconds:{seconds:.2f}")
    if budget is not None:
        budget.finish("ngram_hints", seconds, 0.0, len(hinted), split=False)
    return hints


# --- sliding windows ------------------------------------------------------------------------------
# Targets are tokens[t] for t = 1..N, predicted from tokens[:t]. A window starting at w feeds
# tokens[w:w + L] and can score targets w+1..w+L.


def window_segments(first: int, last: int, seq_len: int, stride: int) -> np.ndarray:
    """Windows that score targets first..last once each, with the longest context: rows (window start,
    first target, last target). Targets <= seq_len go to one window at 0 (it scores all its positions);
    later ones come in runs that end on the grid seq_len + k*stride (or at `last`), each scored by the
    full window that ends on the run's last target, so every target sees >= seq_len - stride tokens."""
    rows = []
    if first <= min(seq_len, last):
        rows.append(np.array([[0, first, min(seq_len, last)]]))
        first = min(seq_len, last) + 1
    if first <= last:
        grid = seq_len + -(-(first - seq_len) // stride) * stride  # first grid end >= first
        ends = np.append(np.arange(grid, last, stride), last)
        starts = np.concatenate(([first], ends[:-1] + 1))
        rows.append(np.stack((ends - seq_len, starts, ends), axis=1))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)


def score_windows(loss_fn, tokens, segments: np.ndarray, seq_len: int, stride: int, batch: int, tables: ByteTables,
                  scores: Scores, on_batch=None, hints=None):
    """Score window segments (rows of window_segments) on tokens (the stream, on the device).

    The one window that scores more than `stride` targets runs on its own with losses for every position;
    the rest run `batch` at a time with losses for their last `stride` positions only, padded with empty
    segments so compiled shapes never change. on_batch(i) is called after each batch of the rest. With
    hints (NGRAM_TILT) loss_fn takes the targets' hints as a third argument.

    That one window (the stream's first seq_len targets) runs uncompiled (`loss_fn.eager`): it occurs once
    in a pass, and a graph of its own shape would cost a compile of tens of seconds for milliseconds of work."""
    device = tokens.device
    long = segments[:, 2] - segments[:, 1] + 1 > stride
    groups = [(segments[long], seq_len, 1, getattr(loss_fn, "eager", loss_fn)),
              (segments[~long], stride, batch, loss_fn)]
    positions = torch.arange(seq_len, device=device)
    for segs, tail, size, group_fn in groups:
        if not len(segs):
            continue
        padding = np.tile([[0, 1, 0]], ((-len(segs)) % size, 1))  # segment [0, 1, 0] scores nothing
        segs = to_device(np.concatenate((segs, padding)), device)
        for i, b in enumerate(range(0, len(segs), size)):
            seg = segs[b:b + size]
            idx = seg[:, :1] + positions
            x = tokens[idx].long()
            target_pos = idx[:, seq_len - tail:] + 1
            y = tokens[target_pos].long()
            mask = (target_pos >= seg[:, 1:2]) & (target_pos <= seg[:, 2:3])
            scores.add(group_fn(x, y, *hint_args(hints, target_pos)), x[:, seq_len - tail:], y, target_pos, mask, tables)
            if on_batch is not None and tail == stride:
                on_batch(i)
    for _, first, last in segments:
        scores.mark(int(first), int(last))


@torch.no_grad()
def evaluate_windows(loss_fn, val_tokens, tables: ByteTables, seq_len: int, stride: int, batch: int, rt: Runtime,
                     budget=None, name: str = "sliding", record: bool = False, hints=None) -> EvalResult:
    """Score every target once with windows of seq_len advancing by stride (stride = seq_len gives the
    non-overlapping evaluation), the windows split contiguously across ranks; hints: see score_windows."""
    t0 = time.perf_counter()
    tokens = val_tokens.to(rt.device, torch.int32)
    n_targets = len(tokens) - 1
    segments = window_segments(1, n_targets, seq_len, stride)
    lo, hi = share(len(segments), rt.rank, rt.world_size)
    scores = Scores(rt.device, n_targets + 1 if record else 0, n_targets)
    on_batch = None
    if budget is not None:
        # Estimate from the first batches (the first one compiles), at a batch index every rank reaches.
        short = segments[:, 2] - segments[:, 1] + 1 <= stride
        shares = [share(len(segments), r, rt.world_size) for r in range(rt.world_size)]
        batches = [-(-int(short[a:b].sum()) // batch) for a, b in shares]
        check_at, marks = min(8, min(batches) - 1), {}

        def on_batch(i):
            if i in (0, check_at):
                rt.sync()
                marks[i] = time.perf_counter() - t0
            if i == check_at and check_at >= 1:
                per_batch = (marks[check_at] - marks[0]) / check_at
                budget.check(name, budget.estimate(marks[0], per_batch, batches[rt.rank] - 1), marks[0])
    score_windows(loss_fn, tokens, segments[lo:hi], seq_len, stride, batch, tables, scores, on_batch, hints)
    result = scores.result(rt, time.perf_counter() - t0, record)
    if budget is not None:
        budget.finish(name, result.seconds, marks.get(0, 0.0), result.targets)
    return result


@torch.no_grad()
def evaluate(model: GPT, loss_fn, val_tokens: torch.Tensor, tables: ByteTables, seq_len: int, batch_seqs: int,
             rt: Runtime) -> EvalResult:
    """Non-overlapping windows of seq_len, split contiguously across ranks."""
    was_training = model.training
    model.eval()
    result = evaluate_windows(loss_fn, val_tokens, tables, seq_len, seq_len, batch_seqs, rt)
    model.train(was_training)
    return result


# --- the eval budget ------------------------------------------------------------------------------


class EvalBudget:
    """Times the passes and estimates each for the full validation on 8 GPUs, assuming the work per
    target is the same and splits evenly over GPUs: seconds on this run x (40,540,160 / targets here) x
    (GPUs here / 8), plus a fixed part (compile, first batch) taken as is. check() refuses, on CUDA,
    a pass whose estimate would take the total over EVAL_BUDGET_SECONDS, unless EVAL_FORCE=1.
    What the total holds is EVAL_BUDGET_COUNTS: by default each pass's fixed part is left out, as the records
    leave TTT's compile warm-up out of their eval time (frontier.md 4; they drop their diagnostic passes too,
    which this count keeps), so that a run the challenge accepts is not refused; `all` keeps it in (a fresh
    process on 8 GPUs compiles too). The lines give the fixed parts (fixed_seconds) and both totals."""

    def __init__(self, s: Settings, rt: Runtime, n_targets: int):
        self.rt, self.limit, self.force = rt, s.eval_budget_seconds, s.eval_force
        self.scale = FULL_VAL_TARGETS / n_targets * rt.world_size / BUDGET_GPUS
        self.enforced = rt.device.type == "cuda" and not s.eval_force  # a CPU rate says nothing about H100s
        self.counts = s.eval_budget_counts
        self.done = []  # (name, seconds, estimated 8-GPU seconds)
        self.fixed = []  # each finished pass's fixed part (compile warm-up, first batch), in seconds

    def estimate(self, fixed: float, per_unit: float, units: float) -> float:
        return fixed + per_unit * units * self.scale

    @staticmethod
    def estimate_unscaled(per_unit: float, full_units: float) -> float:
        """8-GPU seconds of work whose size does not follow the validation's length (TTT_PHASES' SGD over a
        fixed number of documents): full_units units in the full run, shared by the 8 GPUs, at per_unit
        seconds per unit on one GPU here."""
        return per_unit * full_units / BUDGET_GPUS

    def counted(self, total: float, fixed: float) -> float:
        """The part of an 8-GPU total that EVAL_BUDGET_COUNTS holds against the budget."""
        return total - fixed if self.counts == "records" else total

    def check(self, name: str, estimate: float, fixed: float = 0.0):
        """Collective: every rank calls it at the same point and all take the largest estimate (and fixed part,
        the compile warm-up and first batch inside the estimate)."""
        both = torch.tensor([estimate, fixed], dtype=torch.float64, device=self.rt.device)
        estimate, fixed = self.rt.all_reduce(both, op=dist.ReduceOp.MAX).tolist()
        total = sum(e for _, _, e in self.done) + estimate
        counted = self.counted(total, sum(self.fixed) + fixed)
        self.rt.log(f"eval_budget:early pass:{name} estimated_8gpu_pass_seconds:{estimate:.0f} "
                    f"estimated_8gpu_total_seconds:{total:.0f} budget_seconds:{self.limit:.0f} "
                    f"enforced:{int(self.enforced)} fixed_seconds:{fixed:.1f} counts:{self.counts} "
                    f"counted_seconds:{counted:.0f}")
        if counted > self.limit and self.enforced:
            raise UserError(f"the evaluation passes would take about {counted:.0f}s on 8 GPUs for the full validation "
                            f"(EVAL_BUDGET_COUNTS={self.counts}; {name}: {estimate:.0f}s, of which {fixed:.0f}s "
                            f"fixed), over EVAL_BUDGET_SECONDS={self.limit:.0f}: make TTT cheaper (TTT_EPOCHS, "
                            f"TTT_MODE, TTT_PHASES, EVAL_STRIDE) or set EVAL_FORCE=1 to run anyway")

    def finish(self, name: str, seconds: float, fixed: float, targets: int, unscaled: tuple = (0.0, 0.0),
               split: bool = True) -> float:
        """unscaled: (seconds here, 8-GPU estimate) of a part that does not scale with the validation's length.
        split=False: work every rank does for the whole stream, which more GPUs do not share."""
        scale = self.scale if split else self.scale * BUDGET_GPUS / self.rt.world_size
        estimate = fixed + (seconds - fixed - unscaled[0]) * scale + unscaled[1]
        self.done.append((name, seconds, estimate))
        self.fixed.append(fixed)
        self.rt.log(f"eval_budget:pass pass:{name} seconds:{seconds:.1f} scored_targets:{targets} "
                    f"seconds_per_mtok:{1e6 * seconds / targets:.2f} estimated_8gpu_full_val_seconds:{estimate:.0f} "
                    f"fixed_seconds:{fixed:.1f}")
        return estimate

    def summary(self, seconds: float) -> float:
        total = sum(e for _, _, e in self.done)
        counted = self.counted(total, sum(self.fixed))
        status = "ok" if counted <= self.limit else ("over_budget_forced" if self.force else "over_budget")
        passes = ",".join(f"{n}={t:.1f}s" for n, t, _ in self.done) or "none"
        self.rt.log(f"eval_budget: passes:{passes} measured_seconds:{seconds:.1f} "
                    f"estimated_8gpu_full_val_seconds:{total:.0f} budget_seconds:{self.limit:.0f} "
                    f"enforced:{int(self.enforced)} status:{status} fixed_seconds:{sum(self.fixed):.1f} "
                    f"counts:{self.counts} counted_seconds:{counted:.0f}")
        return total


# --- score-first TTT, chunk mode (PR #1529) ---------------------------------------------------------
# The stream is cut into chunks of TTT_CHUNK_TOKENS targets, taken in order. Each chunk is first scored
# under no_grad with the sliding windows (by weights trained only on earlier chunks), then the model
# trains on that chunk's targets, which are now scored. The last chunk is never trained on. HASH_EMBED_ENABLED
# adds a HashEmbedding (MODEL section) that only TTT trains.


def all_reduce_sum_grads(params, rt: Runtime):
    grads = [p.grad for p in params]
    flat = rt.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


def cosine_over_chunks(lr: float, c: int, n_chunks: int) -> float:
    """Chunk c's learning rate, cosine-decayed from lr at the first chunk to 0 at the last (n_chunks >= 2),
    which is therefore never trained on."""
    return lr * 0.5 * (1 + math.cos(math.pi * c / (n_chunks - 1)))


def sgd_step_sizes(s: Settings) -> set:
    """The step sizes (sequences) of SGD over one full TTT_CHUNK_TOKENS chunk: the compile warm-up's shapes."""
    per_chunk = s.ttt_chunk_tokens // s.eval_seq_len
    return {min(s.ttt_batch_seqs, per_chunk - b) for b in range(0, per_chunk, s.ttt_batch_seqs)}


def ttt_train_chunk(train_fn, params, opt, tokens, first: int, last: int, lr: float, epochs: int, s: Settings,
                    rt: Runtime, scores: Scores, hints=None):
    """`epochs` passes of SGD on targets first..last, already scored by every rank.

    The chunk is cut into whole EVAL_SEQ_LEN sequences; each step takes the next TTT_BATCH_SEQS of them,
    shared contiguously by the ranks. The loss is the sum over this rank's tokens divided by the step's
    token count on all ranks, and gradients are summed, so the update equals one process's. A rank with
    no sequence still joins the all-reduce with zero gradients. With hints (NGRAM_TILT) the loss is the
    tilted one the targets were scored with."""
    L = s.eval_seq_len
    n = (last - first + 1) // L
    scores.require_range(first, first + n * L - 1)
    if scores.hits is not None and not bool((scores.hits[first:first + n * L] > 0).all()):
        raise RuntimeError("score-first violated: the recorded scores miss targets TTT is about to train on")
    for group in opt.param_groups:
        group["lr"] = lr
    for _ in range(epochs):
        for b in range(0, n, s.ttt_batch_seqs):
            count = min(s.ttt_batch_seqs, n - b)
            lo, hi = (b + i for i in share(count, rt.rank, rt.world_size))
            opt.zero_grad(set_to_none=False)
            if hi > lo:
                span = tokens[first - 1 + lo * L:first + hi * L].long()
                x, y = span[:-1].view(hi - lo, L), span[1:].view(hi - lo, L)
                positions = torch.arange(first + lo * L, first + hi * L, device=tokens.device).view(hi - lo, L)
                (train_fn(x, y, *hint_args(hints, positions)).sum() / (count * L)).backward()
            if rt.world_size > 1:
                all_reduce_sum_grads(params, rt)
            if s.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, s.ttt_grad_clip)
            opt.step()


def evaluate_ttt_chunk(model: GPT, s: Settings, rt: Runtime, val_tokens, tables: ByteTables, budget=None,
                       record: bool = False, hints=None) -> EvalResult:
    """Legal score-first TTT over chunks (spec 7.4) on a copy of model; returns the scores. hints: the
    n-gram tilt's (prepare_ngram_hints), which scoring and training then both use."""
    t0 = time.perf_counter()
    L, C, stride = s.eval_seq_len, s.ttt_chunk_tokens, s.eval_stride
    n_targets = len(val_tokens) - 1
    n_chunks = -(-n_targets // C)
    ttt = copy.deepcopy(model).eval()  # the weights other passes use stay untouched
    hash_emb = HashEmbedding(s.hash_embed_size, ttt.dim).to(rt.device) if s.hash_embed_enabled else None
    for i, block in enumerate(ttt.blocks):
        block.requires_grad_(i >= s.ttt_freeze_blocks)
    params = [p for p in ttt.parameters() if p.requires_grad] + (list(hash_emb.parameters()) if hash_emb else [])
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=s.ttt_lr, momentum=s.ttt_momentum)

    def losses(x, y, hints=None):
        return ttt.token_losses(x, y, extra_embedding=hash_emb, hints=hints)
    loss_fn = compiled(losses, s.compile)
    tokens = val_tokens.to(rt.device, torch.int32)
    scores = Scores(rt.device, n_targets + 1 if record else 0, n_targets)
    frozen = sum(p.numel() for p in ttt.parameters() if not p.requires_grad)
    rt.log(f"ttt:protocol rule:score-first mode:chunk chunks:{n_chunks} chunk_tokens:{C} window:{L} stride:{stride} "
           "order:original "
           f"epochs:{s.ttt_epochs} optimizer:sgd lr:{s.ttt_lr} schedule:cosine_over_chunks momentum:{s.ttt_momentum} "
           f"grad_clip:{s.ttt_grad_clip} batch_seqs:{s.ttt_batch_seqs} freeze_blocks:{s.ttt_freeze_blocks} "
           f"hash_embed:{int(hash_emb is not None)} ngram_tilt:{int(hints is not None)} last_chunk_trained:0 "
           f"params_trained:{sum(p.numel() for p in params)} params_frozen:{frozen}")
    if s.compile:
        warm_up_chunk_ttt(loss_fn, params, s, rt, ttt.vocab_size, sgd_step_sizes(s), tilted=hints is not None)
    fixed, check_at, log_every = 0.0, min(3, n_chunks - 1), max(1, n_chunks // 10)
    for c in range(n_chunks):
        first, last = c * C + 1, min((c + 1) * C, n_targets)
        segments = window_segments(first, last, L, stride)
        lo, hi = share(len(segments), rt.rank, rt.world_size)
        with torch.no_grad():
            score_windows(loss_fn, tokens, segments[lo:hi], L, stride, s.eval_batch_windows, tables, scores,
                          hints=hints)
        if rt.world_size > 1:
            # The other ranks score the rest of this chunk; none can finish the first TTT step (its
            # gradient all-reduce) before every rank has scored its share.
            scores.mark(first, last)
        if c < n_chunks - 1 and s.ttt_epochs > 0:
            ttt_train_chunk(loss_fn, params, opt, tokens, first, last, cosine_over_chunks(s.ttt_lr, c, n_chunks),
                            s.ttt_epochs, s, rt, scores, hints)
        if c == 0 or (c == check_at and budget is not None) or (c + 1) % log_every == 0 or c == n_chunks - 1:
            rt.sync()
            elapsed = time.perf_counter() - t0
            if c == 0:
                fixed = elapsed
            if c == check_at and c >= 1 and budget is not None:
                budget.check("ttt_chunk", budget.estimate(fixed, (elapsed - fixed) / c, n_chunks - 1), fixed)
            if (c + 1) % log_every == 0 or c == n_chunks - 1:
                sums = scores.sums.tolist()
                rt.log(f"ttt_chunk chunk:{c + 1}/{n_chunks} rank0_bpb:{sums[0] / math.log(2) / max(sums[2], 1):.6f} "
                       f"elapsed:{elapsed:.1f}s")
    rt.log(f"ttt:score_first_guard status:active checks:{scores.guard_checks} "
           f"targets_scored:{int(scores.scored.sum())}")
    result = scores.result(rt, time.perf_counter() - t0, record)
    if budget is not None:
        budget.finish("ttt_chunk", result.seconds, fixed, result.targets)
    return result


def random_tokens(shape, vocab: int, s: Settings, device):
    """Compile warm-up input: random ids, never validation data."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(s.seed)).to(device)


def random_losses(loss_fn, rows: int, width: int, targets: int, vocab: int, s: Settings, rt: Runtime,
                  tilted: bool = False):
    """loss_fn on random inputs [rows, width] and targets [rows, targets], with random hints (int32, as
    ngram_hints gives them) when tilted: a warm-up call in the shapes and dtypes of the real ones."""
    x, y = random_tokens((rows, width), vocab, s, rt.device), random_tokens((rows, targets), vocab, s, rt.device)
    hints = (random_tokens((rows, targets), vocab, s, rt.device).to(torch.int32),) if tilted else ()
    return loss_fn(x, y, *hints)


def warm_up_chunk_ttt(loss_fn, params, s: Settings, rt: Runtime, vocab: int, step_sizes, tilted: bool = False):
    """Compile the scoring and training graphs (steps of each size in step_sizes, shared by the ranks) on
    random tokens (and random hints when tilted); no step is taken, so the weights are unchanged."""
    t0 = time.perf_counter()
    L, stride, batch = s.eval_seq_len, s.eval_stride, s.eval_batch_windows
    with torch.no_grad():  # the stream's first window runs uncompiled (score_windows): no [1, L] graph
        random_losses(loss_fn, batch, L, stride, vocab, s, rt, tilted)
    warm_up_sgd_steps(loss_fn, params, s, rt, vocab, step_sizes, t0, tilted)


def warm_up_sgd_steps(loss_fn, params, s: Settings, rt: Runtime, vocab: int, step_sizes, t0: float,
                      tilted: bool = False):
    """Compile the training graph for steps of each size in step_sizes (shared by the ranks) on random tokens
    (and random hints when tilted), forward and backward only: the gradients are zeroed and no step is taken."""
    L = s.eval_seq_len
    for size in step_sizes:
        lo, hi = share(size, rt.rank, rt.world_size)
        if hi > lo:
            random_losses(loss_fn, hi - lo, L, L, vocab, s, rt, tilted).sum().backward()
    for p in params:
        p.grad.zero_()
    rt.sync()
    rt.log(f"ttt:warmup data:random_tokens seconds:{time.perf_counter() - t0:.1f}")


# --- score-first TTT, document mode (PR #1530 done legally) -------------------------------------------
# Documents are split at BOS; each keeps the next document's BOS as its last target. A document is
# scored TTT_CHUNK_SIZE targets at a time, in a window of its own tokens only (its own row, right-padded,
# so causal attention never sees another document), the last EVAL_SEQ_LEN tokens ending at the chunk's
# nominal end. After scoring a chunk, its document's LoRA adapters take one AdamW step on it (not after
# its last chunk). Adapters and AdamW state start from the same fresh row for every document, so documents
# are independent and batching cannot change any score; documents enter in their original order (lora_plan).
#
# Options from the later records, all off by default. TTT_LORA_TARGETS leaves some outputs unadapted (their
# matrices are not in the row at all); TTT_LORA_ALPHA scales every adapter output by alpha / rank.
# TTT_SHORT_DOC_TOKENS scores the first targets of every document in smaller chunks, so short documents
# wholly (more score-then-update steps where a document gives few; by position, see LoRAChunks); a batch
# still shares one window width, at least TTT_CHUNK_SIZE, a small chunk's window right-padded up to it.
# TTT_LORA_RESET=b_only (warm-start A) zeroes only B when a document opens: A keeps the values the slot's
# previous document ended with (the free slots are a stack, so that is the most recently finished
# document; a slot never used holds the fresh row). Still score-first: a slot is freed only after its
# document's last chunk is scored, and that chunk never trains, so an inherited A has learned only from
# scored targets, of documents earlier in the stream (documents open in stream order). Documents are then
# no longer independent: which earlier document hands its A on, and so the score, depends on the batching
# (TTT_BATCH_DOCS, TTT_DOCS_IN_FLIGHT) and on how many ranks split the documents, as in the records; each
# rank's first documents start from the fresh row. B = 0 still has a document's first chunk scored by
# the unadapted model.
#
# Why a flat row per document: each document in flight owns one row of AdapterSlots.P holding all its
# adapter matrices back to back (LoRALayout says where each sits). A step gathers the rows of the
# documents it batches, views them as one [rows, in, out] tensor per matrix (so row r of the batch uses
# row r's adapters through batched matmuls), and writes the updated rows back. Opening a document is one
# row copy, closing it frees the slot; no per-document modules or optimizers are built.
# Why a hand-written AdamW (AdapterSlots.adamw_): torch.optim keeps one state per parameter tensor, but
# here every row is a different document with its own step count (bias correction) and its own reset,
# and a step touches only the rows in the batch. Updating the gathered rows in place, a few at a time,
# does exactly AdamW per document with no per-document optimizer objects and small fp32 temporaries.


class LoRALayout:
    """Where each adapter matrix of one document sits in its flat parameter row. Per virtual layer: one A
    [dim, n rank] shared by the n adapted ones of Q, K, V and O (all read the block's normed input, so their
    A matrices side by side make one matmul), then their B [rank, out] in that order; then A, B of the MLP;
    last A, B of the head. A target left out (TTT_LORA_TARGETS) has no matrices. With all targets,
    mathematically the same as separate rank-`rank` adapters, with 7 matmuls a layer, not 10. Every
    adapter's output is multiplied by `scale`: alpha / rank with TTT_LORA_ALPHA, else 1."""

    def __init__(self, model: GPT, rank: int, targets: tuple = LORA_TARGETS, alpha: float = 0.0):
        s = model.settings
        dim, kv = model.dim, s.num_kv_heads * (s.model_dim // s.num_heads)
        width = {"q": dim, "k": kv, "v": kv, "o": dim}
        self.attn_targets = tuple(t for t in ("q", "k", "v", "o") if t in targets)
        self.has_mlp, self.has_head = "mlp" in targets, "head" in targets
        layer = []
        if self.attn_targets:
            layer += [(dim, len(self.attn_targets) * rank, True)] + [(rank, width[t], False) for t in self.attn_targets]
        if self.has_mlp:
            layer += [(dim, rank, True), (rank, dim, False)]
        head = [(dim, rank, True), (rank, model.vocab_size, False)] if self.has_head else []
        self.rank, self.per_layer = rank, len(layer)
        self.scale = alpha / rank if alpha > 0 else 1.0
        self.mats, offset = [], 0  # (offset, rows, cols, is_A)
        for rows, cols, is_a in layer * len(model.schedule()) + head:
            self.mats.append((offset, rows, cols, is_a))
            offset += rows * cols
        self.size = offset

    def scaled(self, h):
        """h, the input's projection on A, times the output scale (skipped at 1: default scores stay bit-exact)."""
        return h if self.scale == 1.0 else h * self.scale

    def reset_spans(self, reset: str) -> list:
        """(lo, hi) spans of the row a new document takes from the fresh row: all of it, or with b_only the
        B matrices (adjacent ones merged), so that A keeps what the slot's previous document learned."""
        if reset == "all":
            return [(0, self.size)]
        spans = []
        for offset, rows, cols, is_a in self.mats:
            if is_a:
                continue
            if spans and spans[-1][1] == offset:
                spans[-1] = (spans[-1][0], offset + rows * cols)
            else:
                spans.append((offset, offset + rows * cols))
        return spans

    def fresh_row(self, seed: int, device) -> torch.Tensor:
        """A uniform in +-1/sqrt(in), B zero: a fresh row leaves the model's outputs unchanged."""
        g = torch.Generator().manual_seed(seed)
        row = torch.zeros(self.size)
        for offset, rows, cols, is_a in self.mats:
            if is_a:
                row[offset:offset + rows * cols] = (torch.rand(rows * cols, generator=g) * 2 - 1) / math.sqrt(rows)
        return row.to(device)

    def matrices(self, P, dtype) -> list:
        """Rows P [R, size] as one leaf [R, rows, cols] per matrix, in dtype (the model's compute dtype:
        the matmuls run in it anyway, and so does their gradient). Separate leaves, because inside a
        compiled graph slices of one big P would make every matrix's gradient a scatter over all of P."""
        P = P.to(dtype)
        return [P[:, offset:offset + rows * cols].view(-1, rows, cols).detach().requires_grad_()
                for offset, rows, cols, _ in self.mats]

    @staticmethod
    def gradient(matrices) -> torch.Tensor:
        """The matrices' gradients as one [R, size] block, laid out as P."""
        # a layer without attention (ATTN_OFF_LAYERS) leaves its Q, K, V, O adapters without a gradient
        return torch.cat([(m.grad if m.grad is not None else torch.zeros_like(m)).reshape(m.size(0), -1)
                          for m in matrices], 1)


class DocLoRA:
    """The `lora` hook of GPT.forward_hidden: row r of each matrix (LoRALayout.matrices) adapts row r of the batch."""

    def __init__(self, layout: LoRALayout, matrices: list):
        self.layout, self.matrices = layout, matrices

    def adapter(self, pos: int):
        """Virtual layer pos's adapters; None when no target sits inside the layers (TTT_LORA_TARGETS=head)."""
        per = self.layout.per_layer
        return LayerAdapters(self.layout, self.matrices[pos * per:(pos + 1) * per]) if per else None

    def head(self, hidden):
        if not self.layout.has_head:
            return None
        return torch.bmm(self.layout.scaled(torch.bmm(hidden, self.matrices[-2])), self.matrices[-1])


class LayerAdapters:
    """One virtual layer's adapters; inputs x [R, T, dim] in the matrices' dtype. A delta is None for a
    target without an adapter."""

    def __init__(self, layout: LoRALayout, matrices: list):
        self.layout, self.matrices = layout, matrices

    def attn(self, x):
        """The Q, K, V and O deltas, all from the block's normed input x."""
        targets, r = self.layout.attn_targets, self.layout.rank
        if not targets:
            return None, None, None, None
        h = self.layout.scaled(torch.bmm(x, self.matrices[0]))
        deltas = {t: torch.bmm(h[..., i * r:(i + 1) * r], b) for i, (t, b) in
                  enumerate(zip(targets, self.matrices[1:1 + len(targets)]))}
        return tuple(deltas.get(t) for t in ("q", "k", "v", "o"))

    def mlp(self, x):
        if not self.layout.has_mlp:
            return None
        return torch.bmm(self.layout.scaled(torch.bmm(x, self.matrices[-2])), self.matrices[-1])


class AdapterSlots:
    """LoRA rows and their AdamW state for the documents in flight, one fixed slot per document. A step
    gathers its rows, updates them and writes them back; a document's slot starts with zero optimizer
    state and the `reset` spans (LoRALayout.reset_spans) of the shared fresh row: all of it, so every
    document starts from the same adapter, or (b_only) its B, keeping the A of the slot's previous document."""

    def __init__(self, row: torch.Tensor, capacity: int, beta1: float, reset: list | None = None):
        self.row, self.reset = row, [(0, row.numel())] if reset is None else reset
        self.P = row.expand(capacity + 1, -1).clone()
        self.v = torch.zeros_like(self.P)
        self.m = torch.zeros_like(self.P) if beta1 > 0 else None  # first moment, only with TTT_LORA_BETA1 > 0
        self.t = torch.zeros(capacity + 1, 1, device=row.device)     # AdamW steps each slot has taken
        self.free = list(range(capacity - 1, -1, -1))
        self.scratch = capacity  # the extra slot: a padding row's adapter, never a document's

    def open(self, n: int) -> np.ndarray:
        slots = np.array([self.free.pop() for _ in range(n)], dtype=np.int64)
        idx = to_device(slots, self.P.device)
        for lo, hi in self.reset:
            self.P[idx, lo:hi] = self.row[lo:hi]
        for state in (self.v, self.m, self.t):
            if state is not None:
                state[idx] = 0
        return slots

    def close(self, slots: np.ndarray):
        self.free.extend(slots.tolist())

    @torch.no_grad()
    def adamw_(self, idx, grad, s: Settings, eps: float = 1e-10, rows_at_once: int = 16):
        """One AdamW step for slots idx with gradient grad [R, size] (any float dtype). The bias correction
        is per row, as each document counts its own steps. Rows go a few at a time, so the fp32
        temporaries stay small next to the adapters themselves."""
        b1, b2, lr = s.ttt_lora_beta1, s.ttt_lora_beta2, s.ttt_lora_lr
        for lo in range(0, len(idx), rows_at_once):
            i, g = idx[lo:lo + rows_at_once], grad[lo:lo + rows_at_once].float()
            t = self.t[i] + 1
            v = self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.m is not None:
                m = self.m[i].mul_(b1).add_(g, alpha=1 - b1)
                self.m[i] = m
                g = m / (1 - b1 ** t)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
            self.P[i] = self.P[i].mul_(1 - lr * s.ttt_lora_wd).addcdiv_(g, denom, value=-lr)
            self.v[i], self.t[i] = v, t


class LoRAChunks:
    """Where a document's score-before-update chunks end, by chunk index j alone: TTT_CHUNK_SIZE targets
    at a time, after (with TTT_SHORT_DOC_TOKENS) a first stretch of smaller chunks covering that many
    targets, rounded up to whole small chunks, so that a shorter document is scored wholly in small chunks
    (PR #2014). By position, never by the document's length: that is known only at its end, and letting
    it choose how the first tokens are chunked would make their scores depend on later tokens."""

    def __init__(self, C: int, L: int, short_tokens: int = 0, short_size: int = 1):
        self.C, self.L, self.short_size = C, L, short_size
        self.n_short = -(-short_tokens // short_size) if short_tokens else 0
        self.prefix = self.n_short * short_size  # targets scored in small chunks

    @classmethod
    def of(cls, s: Settings) -> "LoRAChunks":
        return cls(s.ttt_chunk_size, s.eval_seq_len, s.ttt_short_doc_tokens, s.ttt_short_doc_chunk_size)

    def size(self, j):
        return np.where(j < self.n_short, self.short_size, self.C)

    def end(self, j):
        """Document-local index of chunk j's nominal last target."""
        return np.where(j < self.n_short, self.short_size * (j + 1), self.prefix + self.C * (j + 1 - self.n_short))

    def width(self, j):
        """Chunk j's window: the last L tokens up to its end, and at least C (a small chunk's window is
        right-padded), so every window holds the C target positions the loss function returns."""
        return np.maximum(self.C, np.minimum(self.L, self.end(j)))

    def count(self, lengths):
        """Chunks of documents of `lengths` targets."""
        beyond = np.maximum(lengths - self.prefix, 0)
        return np.where(beyond > 0, self.n_short + -(-beyond // self.C), -(-lengths // self.short_size))

    def first_full(self) -> int:
        """The first chunk whose window is a full L."""
        j = 0
        while self.end(j) < self.L:
            j += 1
        return j


def lora_step(start, length, chunk, slot, slots: AdapterSlots, layout: LoRALayout, loss_fn, tokens, s: Settings,
              tables: ByteTables, scores: Scores, hints=None) -> int:
    """Score chunk[i] of the document at stream offset start[i] (length[i] targets) for every row i, then
    one AdamW step on the rows with chunks left, on the loss just scored (tilted with hints, NGRAM_TILT).
    Returns the window tokens processed."""
    L, C, chunks = s.eval_seq_len, s.ttt_chunk_size, LoRAChunks.of(s)
    W = int(chunks.width(chunk[0]))
    # Each row's chunk must sit in the last C positions of the batch's W-wide window.
    assert (chunks.width(chunk) == W).all(), "rows with different window widths in one batch"
    work = len(start) * W
    if len(start) == 1:  # a padding row (empty document, scratch adapter): the compiled graph never sees one row
        start, length, chunk, slot = (np.append(a, v) for a, v in ((start, 0), (length, 0), (chunk, chunk[0]),
                                                                      (slot, slots.scratch)))
    chunk_end = chunks.end(chunk)  # document-local index of each chunk's nominal last target
    window_start = np.maximum(0, chunk_end - L)  # document-local index of the window's first input
    first_local, last_local = chunk_end - chunks.size(chunk) + 1, np.minimum(chunk_end, length)
    meta = np.stack((start, window_start, first_local, last_local, slot), 1)
    start_t, win, first, last, idx = to_device(meta, tokens.device).unbind(1)
    end = len(tokens) - 1
    local = win[:, None] + torch.arange(W, device=tokens.device)  # document-local index of each input
    # inputs up to the chunk's last target only: a small chunk's padding hides the tokens after it
    x = torch.where(local < last[:, None], tokens[(start_t[:, None] + local).clamp(max=end)], 0).long()
    target_local = local[:, W - C:] + 1
    mask = (target_local >= first[:, None]) & (target_local <= last[:, None])
    position = (start_t[:, None] + target_local).clamp(max=end)
    y = tokens[position].long()
    # with grad even if no row trains: a graph without it would compile again
    matrices = layout.matrices(slots.P[idx], compute_dtype(tokens.device))
    nll = loss_fn(x, y, matrices, *hint_args(hints, position))
    scores.add(nll, x[:, W - C:], y, position, mask, tables)  # scored before the step below
    first_target, last_target = start + first_local, start + last_local
    for a, b in zip(first_target.tolist(), last_target.tolist()):
        scores.mark(a, b)
    trains = chunk_end < length  # a document's last chunk is never trained on
    if trains.any():
        for a, b in zip(first_target.tolist(), last_target.tolist()):
            scores.require_range(a, b)
        if scores.hits is not None and not bool((scores.hits[position[mask]] > 0).all()):
            raise RuntimeError("score-first violated: the recorded scores miss targets TTT is about to train on")
        (torch.where(mask, nll, 0.0).sum(1) / mask.sum(1).clamp_min(1)).sum().backward()
        # Rows on their last chunk are left as they are: their slot closes, and with b_only its A passes on.
        training = to_device(trains, idx.device)
        slots.adamw_(idx[training], layout.gradient(matrices)[training], s)
    return work


def document_spans(val_tokens, bos_id: int) -> tuple:
    """(start, targets) per document: tokens[start] is its BOS, its targets are tokens[start+1 .. start+targets],
    the last one being the next document's BOS; the final document runs to the end of the stream."""
    tokens = val_tokens.cpu().numpy()
    n = len(tokens) - 1
    starts = np.flatnonzero(tokens[:n] == bos_id)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    return starts, np.diff(np.append(starts, n))


def lora_doc_cost(lengths: np.ndarray, chunks: LoRAChunks) -> np.ndarray:
    """Window tokens a document costs: the sum of its chunks' window widths."""
    counts = chunks.count(lengths)
    widths = chunks.width(np.arange(int(counts.max(initial=0))))
    return np.concatenate(([0], np.cumsum(widths)))[counts]


def lora_plan(lengths: np.ndarray, chunks: LoRAChunks, rows: int, in_flight: int) -> list:
    """The order in which one rank advances its documents, one chunk per document per step: a list of
    arrays of document indices. Documents enter in their original order whenever fewer than `in_flight`
    are open. Each step takes the fullest level (the documents whose next chunk has one window width,
    ties to the wider), at most rows * L / width rows and 4 * rows, so short windows batch more documents."""
    counts = chunks.count(lengths).tolist()
    width = chunks.width(np.arange(max(counts, default=0))).tolist()  # by chunk index
    levels, plan, done = {}, [], [0] * len(counts)  # levels: window width -> documents waiting, in entry order
    entered = open_docs = 0
    while True:
        if open_docs < in_flight and entered < len(counts):
            k = min(in_flight - open_docs, len(counts) - entered)
            levels.setdefault(width[0], []).extend(range(entered, entered + k))
            entered, open_docs = entered + k, open_docs + k
        if not levels:
            return plan
        w = max(levels, key=lambda key: (len(levels[key]), key))
        take = min(rows * chunks.L // w, 4 * rows)  # rows cost memory too: ~6 bytes x adapter size each
        batch, rest = levels[w][:take], levels.pop(w)[take:]
        if rest:
            levels[w] = rest
        plan.append(np.array(batch, dtype=np.int64))
        for d in batch:
            done[d] += 1
            if done[d] < counts[d]:
                levels.setdefault(width[done[d]], []).append(d)
            else:
                open_docs -= 1


# --- phased TTT: global SGD of the base model on the scored prefix (PR #1610, #1626) -----------------
# With TTT_PHASES=N the first TTT_PHASE_PREFIX_DOCS documents are cut into N equal parts (the records'
# boundaries, prefix x k / N). The LoRA pass scores every document of part 1 (each rank its share), then
# the base model takes a pass of SGD over every target scored so far, then part 2 is scored with fresh
# adapters on the updated base, and so on; the documents after the prefix are scored on the base of the
# last phase. Phase k trains on parts 1..k (#1626's multi-phase global SGD) with a fresh momentum, chunk by
# chunk as chunk mode does (ttt_train_chunk, TTT_CHUNK_TOKENS chunks, cosine learning rate over them, so
# the last chunk gets 0 and waits for the next phase). The records take the prefix in their length-sorted
# queue order; here documents keep their original order, so a prefix is one range of targets,
# 1..starts[boundary] (a document's last target is the next one's BOS).
#
# The LoRA options apply in every part alike. With TTT_LORA_RESET=b_only "fresh" means B = 0, and an A
# passes on across a phase as within a part: a slot is freed only when its document is finished, so an A
# entering part k+1 has learned from already scored targets only. With NGRAM_TILT the phases train on the
# tilted loss, as chunk mode does: the targets' hints are those they were scored with.


def phase_boundaries(n_docs: int, s: Settings) -> list:
    """Document counts after which a phase's SGD runs, increasing. They follow from the settings alone, not
    from the number of documents, which later tokens decide (the records clamp the prefix to it); a boundary
    with no document after it is left out, as its SGD could change no score."""
    prefix = s.ttt_phase_prefix_docs
    return sorted(b for b in {prefix * (k + 1) // s.ttt_phases for k in range(s.ttt_phases)} if b < n_docs)


def doc_share(cum: np.ndarray, lo: int, hi: int, rank: int, world_size: int) -> tuple:
    """Rank's contiguous run [a, b) of documents lo..hi-1, of about equal cost (cum: cumulative costs from 0)."""
    a, b = (int(np.searchsorted(cum, cum[lo] + (cum[hi] - cum[lo]) * r / world_size)) for r in (rank, rank + 1))
    return a, hi if rank == world_size - 1 else b


def lora_step_shapes(plans: list, lengths: np.ndarray, chunks: LoRAChunks) -> tuple:
    """Rows, window tokens and window width of every step of a rank's plans, in order, replaying which chunk
    each document is at: the inputs of the per-step cost model below. A one-row step counts two rows
    (lora_step pads it) and its one row's window tokens."""
    at = np.zeros(len(lengths), np.int64)
    rows, tokens, widths = [], [], []
    for plan in plans:
        for batch in plan:
            widths.append(int(chunks.width(at[batch[0]])))
            rows.append(max(len(batch), 2))
            tokens.append(len(batch) * widths[-1])
            at[batch] += 1
    return tuple(np.array(v, np.float64) for v in (rows, tokens, widths))


def fit_step_cost(rows: np.ndarray, tokens: np.ndarray, seconds: np.ndarray):
    """Non-negative least squares seconds ~ per_step + per_row * rows + per_token * window tokens over timed
    LoRA steps: (per_step, per_row, per_token), or None when the steps cannot tell rows from window tokens (one
    window width throughout) or are too few.

    Why three terms: a step's cost is not its window tokens alone. Each row also carries its adapter's gather,
    AdamW update (rank x the adapted widths, the same for a 64-token window as for a 2048-token one) and the
    host's score bookkeeping, so the first steps, many rows of narrow short-document windows, may cost more per
    window token than the full windows after them; one rate per window token from those first steps overstated
    the LoRA pass by half (PRESET=frontier on one H100, 2026-12-06: 556 s of 8-GPU time a tenth of the way in,
    366-381 s finished). And each step has a cost of its own (kernel launches, the host's loop): without that
    term the fit over a whole pass gave back 16.0 s of the 19.6 s its 400 steps took, and a quarter of the way
    in it put the pass 8.5% low (one H100, 2026-12-07). With a constant term the fitted costs of the timed steps
    add up to their time. Non-negative because no step saves time: a term that would come out negative is left
    out (every subset of the terms is fitted, the best fit with no negative cost is kept; with three terms that
    is the exact non-negative least-squares solution). Terms that move together in these steps (the step and
    the row when every step has the same rows) are not fitted together."""
    if len(seconds) < 4 or not np.isfinite(seconds).all():
        return None
    if np.linalg.cond(np.stack((rows / rows.max(), tokens / tokens.max()), 1)) > 1e3:  # ~one width: no split
        return None
    terms = np.stack((np.ones_like(rows, dtype=float), rows, tokens), 1)
    best, best_residual = None, np.inf
    for subset in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
        design = terms[:, subset]
        if len(subset) > 1 and np.linalg.cond(design / design.max(0)) > 1e3:
            continue
        coefficients, *_ = np.linalg.lstsq(design, seconds, rcond=None)
        if (coefficients < 0).any():
            continue
        residual = float(np.square(design @ coefficients - seconds).sum())
        if residual < best_residual:
            best, best_residual = np.zeros(3), residual
            best[list(subset)] = coefficients
    return None if best is None else tuple(float(c) for c in best)


def describe_step_cost(fit: tuple) -> str:
    """fit_step_cost's three costs as the log writes them, in milliseconds (per thousand window tokens)."""
    per_step, per_row, per_token = fit
    return (f"steps_rows_tokens per_step_ms:{1e3 * per_step:.4f} per_row_ms:{1e3 * per_row:.4f} "
            f"per_ktoken_ms:{1e6 * per_token:.4f}")


class StepTimer:
    """Times every LoRA step without a host sync between them: on CUDA an event after each step, read once at
    the end (which syncs); on the CPU the clock, as each step has finished when it returns. A mark with no step
    (after a phase's SGD) starts the next step's interval without being one."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks, self.steps = [], []

    def mark(self, step: int | None = None):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        self.steps.append(step)

    def durations(self) -> tuple:
        """(step indices, seconds) of every step that has a mark before it: all but the first, which carries
        the compile, and nothing of the phases' SGD."""
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
            gaps = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        else:
            gaps = np.diff(np.array(self.marks, np.float64)).tolist()
        timed = [(step, gap) for step, gap in zip(self.steps[1:], gaps) if step is not None]
        return np.array([s for s, _ in timed], np.int64), np.array([g for _, g in timed], np.float64)


def lora_check_step(first_part_steps: int, all_steps: int, parts: int) -> int:
    """The step after which LoRA TTT's early budget check runs, from the shortest rank's plans. Its first steps
    are the narrow windows of documents just begun (short-document chunks above all), which cost more per window
    token than the rest, so the later the check, the truer; the earlier, the less a refusal wastes. With phases
    it comes at the first part's last step, before any SGD: by then that part's documents are scored whole, so
    its steps hold the pass's mix of widths, and the part is the records' 5% of the documents. It is capped at
    a quarter of the pass for a long prefix. Without phases, a tenth of the pass. A step of 0 means no check."""
    if parts > 1:
        return min(first_part_steps - 1, all_steps // 4)
    return all_steps // 10


def lora_early_estimate(budget: EvalBudget, rt: Runtime, timer: StepTimer, shapes: tuple, check_at: int,
                        t_a: float, t_b: float, single_rate_rest: float) -> float:
    """The LoRA pass's 8-GPU estimate at the check: its fixed part t_a (compile warm-up and first step), the
    steps since (t_b - t_a), and the rest of this rank's steps by the per-step, per-row and per-window-token
    costs fitted to the steps timed so far (fit_step_cost) over this rank's lora_step_shapes; where they do not
    fit, every step after the first at the one rate per window token measured so far (single_rate_rest
    seconds). Both go in the log. Against the finished pass, with the fit's two terms of before (no per-step
    cost): on the CPU (2026-12-06, frontier's evaluation of a small model) a tenth of the way in, one rate said
    1.52x and the fit 0.86x; at a quarter, 1.10x and 1.06x, and 1.01x in a run that checked there. On one H100
    (2026-12-07, frontier's evaluation at a quarter) one rate said 1.01x and the two-term fit 0.915x."""
    single = budget.estimate(t_a, 1.0, single_rate_rest)
    step_rows, step_tokens, _ = shapes
    steps, seconds = timer.durations()
    fit = fit_step_cost(step_rows[steps], step_tokens[steps], seconds)
    if fit is None:
        rt.log(f"ttt:lora_early_model at_step:{check_at} fit:none estimated_8gpu_pass_seconds:{single:.0f}")
        return single
    rest_rows, rest_tokens = step_rows[check_at + 1:], step_tokens[check_at + 1:]
    rest = fit[0] * len(rest_rows) + fit[1] * rest_rows.sum() + fit[2] * rest_tokens.sum()
    estimate = budget.estimate(t_a, 1.0, (t_b - t_a) + rest)
    rt.log(f"ttt:lora_early_model at_step:{check_at} fit:{describe_step_cost(fit)} "
           f"estimated_8gpu_pass_seconds:{estimate:.0f} one_rate_estimate:{single:.0f}")
    return estimate


def lora_step_costs(timer: StepTimer, shapes: tuple) -> str:
    """The log's account of where LoRA TTT's step time went: the three-term fit over every timed step, and the
    seconds, rows and window tokens of the steps by window width (narrow ones are the short-document chunks and
    the starts of documents): what a step costs in itself, a row and a window token on this machine over the
    whole pass, against which the early estimate's fit (lora_early_estimate) can be judged. shapes: this
    rank's lora_step_shapes."""
    steps, seconds = timer.durations()
    if len(steps) == 0:
        return "ttt:lora_step_costs rank:0 timed_steps:0"
    rows, tokens, widths = (v[steps] for v in shapes)
    fit = fit_step_cost(rows, tokens, seconds)
    text = (f"ttt:lora_step_costs rank:0 timed_steps:{len(steps)} seconds:{seconds.sum():.2f} "
            f"fit:{'none' if fit is None else describe_step_cost(fit)}")
    edges = (0, 128, 512, 2048, np.inf)
    for lo, hi in zip(edges, edges[1:]):
        pick = (widths > lo) & (widths <= hi)
        if pick.any():
            label = f"width_to_{hi:.0f}" if np.isfinite(hi) else f"width_over_{lo}"
            text += (f" {label}:steps={int(pick.sum())},rows={int(rows[pick].sum())},"
                     f"ktokens={tokens[pick].sum() / 1e3:.0f},seconds={seconds[pick].sum():.2f}")
    return text


class PhasedSGD:
    """TTT_PHASES' SGD on the LoRA pass's base model, in place (the adapters' forward reads it)."""

    def __init__(self, base: GPT, s: Settings, rt: Runtime, starts: np.ndarray, n_targets: int, hints=None):
        self.base, self.s, self.rt = base, s, rt
        self.hints = hints  # NGRAM_TILT: the phases train on the tilted loss the targets were scored with
        self.boundaries = phase_boundaries(len(starts), s)
        self.ends = [int(starts[b]) for b in self.boundaries]  # phase k trains on targets 1..ends[k]
        self.params = list(base.parameters())
        for p in self.params:
            p.grad = torch.zeros_like(p)  # a rank with no sequence in a step still all-reduces them

        def losses(x, y, hints=None):
            return base.token_losses(x, y, hints=hints)
        self.loss_fn = compiled(losses, s.compile)
        # The full validation's phases, its documents taken to be as long on average as these ones.
        mean_doc = n_targets / len(starts)
        full_docs = round(FULL_VAL_TARGETS / mean_doc)
        self.full_run_tokens = self.trained_tokens([round(b * mean_doc) for b in phase_boundaries(full_docs, s)])
        self.seconds, self.tokens = 0.0, 0

    def trained_tokens(self, ends) -> int:
        """Tokens the phases ending at targets `ends` train on, over all ranks: every chunk but the last is whole."""
        C, L = self.s.ttt_chunk_tokens, self.s.eval_seq_len
        return sum(-(-end // C) - 1 for end in ends) * (C // L) * L * self.s.ttt_phase_epochs

    def protocol(self) -> str:
        s = self.s
        return (f" phases:{s.ttt_phases} phase_prefix_docs:{s.ttt_phase_prefix_docs} "
                f"phase_boundaries_docs:{','.join(map(str, self.boundaries)) or 'none'} phase_trains_on:scored_prefix "
                f"phase_params:all phase_optimizer:sgd phase_lr:{s.ttt_phase_lr} phase_schedule:cosine_over_chunks "
                f"phase_epochs:{s.ttt_phase_epochs} phase_chunk_tokens:{s.ttt_chunk_tokens} "
                f"phase_momentum:{s.ttt_momentum} phase_grad_clip:{s.ttt_grad_clip} phase_batch_seqs:{s.ttt_batch_seqs}")

    def warm_up(self, vocab: int):
        self.base.requires_grad_(True)
        warm_up_sgd_steps(self.loss_fn, self.params, self.s, self.rt, vocab, sgd_step_sizes(self.s),
                          time.perf_counter(), tilted=self.hints is not None)
        self.base.requires_grad_(False)

    def train(self, k: int, tokens, scores: Scores):
        """Phase k's SGD over targets 1..ends[k], once every rank has scored its share of them."""
        s, rt = self.s, self.rt
        t0 = time.perf_counter()
        first, end = self.ends[k - 1] + 1 if k else 1, self.ends[k]
        if rt.world_size > 1:
            # Each rank marked only its own documents: count this part's scored targets over all ranks
            # before taking the other ranks' share as scored too.
            mine = torch.tensor([float(scores.scored[first:end + 1].sum())], dtype=torch.float64, device=rt.device)
            if int(rt.all_reduce(mine).item()) != end - first + 1:
                raise RuntimeError(f"score-first violated: phase {k + 1} is about to train on targets {first}..{end}, "
                                   "not all of which are scored yet")
            scores.mark(first, end)
        C = s.ttt_chunk_tokens
        n_chunks = -(-end // C)
        opt = torch.optim.SGD(self.params, lr=s.ttt_phase_lr, momentum=s.ttt_momentum)
        self.base.requires_grad_(True)
        for c in range(n_chunks - 1):
            ttt_train_chunk(self.loss_fn, self.params, opt, tokens, c * C + 1, (c + 1) * C,
                            cosine_over_chunks(s.ttt_phase_lr, c, n_chunks), s.ttt_phase_epochs, s, rt, scores,
                            self.hints)
        self.base.requires_grad_(False)
        rt.sync()
        seconds, tokens_trained = time.perf_counter() - t0, self.trained_tokens([end])
        self.seconds, self.tokens = self.seconds + seconds, self.tokens + tokens_trained
        rt.log(f"ttt:phase phase:{k + 1}/{len(self.ends)} docs_scored:{self.boundaries[k]} trained_targets:1..{end} "
               f"chunks_trained:{n_chunks - 1} trained_tokens:{tokens_trained} seconds:{seconds:.1f}")

    def estimate(self, budget: EvalBudget, fallback_rate: float) -> float:
        """8-GPU seconds of the full run's phases, at the rate measured so far (seconds per token on one
        rank) or, before any phase, at fallback_rate (a LoRA window token: both a forward and a backward)."""
        rate = self.seconds / (self.tokens / self.rt.world_size) if self.tokens else fallback_rate
        return budget.estimate_unscaled(rate, self.full_run_tokens)


def evaluate_ttt_lora(model: GPT, s: Settings, rt: Runtime, val_tokens, tables: ByteTables, bos_id: int, budget=None,
                      record: bool = False, hints=None) -> EvalResult:
    """Legal score-first per-document LoRA TTT (spec 7.5, in original document order) on a frozen copy of model,
    with TTT_PHASES' SGD of that copy between parts of the documents. Ranks take contiguous runs of each
    part's documents of about equal cost and follow lora_plan. hints: the n-gram tilt's (prepare_ngram_hints),
    which scoring, the adapter steps and the phases' SGD then all use."""
    t0 = time.perf_counter()
    L, C = s.eval_seq_len, s.ttt_chunk_size
    n_targets = len(val_tokens) - 1
    starts, lengths = document_spans(val_tokens, bos_id)
    chunks = LoRAChunks.of(s)
    cum = np.concatenate(([0], np.cumsum(lora_doc_cost(lengths, chunks))))
    counts = chunks.count(lengths)
    in_flight = max(s.ttt_docs_in_flight, s.ttt_batch_docs)
    base = copy.deepcopy(model).eval().requires_grad_(False)
    phased = PhasedSGD(base, s, rt, starts, n_targets, hints) if s.ttt_phases else None
    boundaries = phased.boundaries if phased else []
    shares = [doc_share(cum, lo, hi, rt.rank, rt.world_size)
              for lo, hi in zip([0] + boundaries, boundaries + [len(lengths)])]
    plans = [[a + batch for batch in lora_plan(lengths[a:b], chunks, s.ttt_batch_docs, in_flight)] for a, b in shares]
    rank_work = sum(int(cum[b] - cum[a]) for a, b in shares)
    targets = lora_targets(s)
    layout = LoRALayout(base, s.ttt_lora_rank, targets, s.ttt_lora_alpha)
    row = layout.fresh_row(s.seed, rt.device)

    loss_fn = lora_losses(base, layout, s)
    tokens = val_tokens.to(rt.device, torch.int32)
    scores = Scores(rt.device, n_targets + 1 if record else 0, n_targets)
    steps = sum(len(plan) for plan in plans)
    reset = "per_document" if s.ttt_lora_reset == "all" else "b_only a_start:slot_predecessor"
    rt.log(f"ttt:protocol rule:score-first mode:lora docs:{len(cum) - 1} split:bos chunk:{C} "
           f"small_chunk:{chunks.short_size if chunks.n_short else C} small_chunked_targets:{chunks.prefix} "
           f"window:{L} context:document_only "
           f"order:original reset:{reset} rank:{s.ttt_lora_rank} targets:{','.join(targets)} "
           f"alpha:{s.ttt_lora_alpha:g} scale:{layout.scale:g} optimizer:adamw "
           f"lr:{s.ttt_lora_lr} betas:({s.ttt_lora_beta1},{s.ttt_lora_beta2}) wd:{s.ttt_lora_wd} steps_per_chunk:1 "
           f"last_chunk_trained:0 ngram_tilt:{int(hints is not None)} batch_docs:{s.ttt_batch_docs} "
           f"docs_in_flight:{in_flight} "
           f"adapter_params_per_doc:{layout.size} rank0_steps:{steps}{phased.protocol() if phased else ' phases:0'}")
    if phased and s.compile:
        phased.warm_up(base.vocab_size)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with attention_without_cudnn():  # the batch shape changes almost every step
        if s.compile:
            warm_up_lora(loss_fn, layout, row, s, rt, base.vocab_size, tilted=hints is not None)
        check_at, lora_estimate, timer = -1, None, StepTimer(rt.device)
        shapes = lora_step_shapes(plans, lengths, chunks)  # rows, window tokens and width of every step
        if budget is not None:  # the same step on every rank: the shortest plans decide
            shortest = rt.all_reduce(torch.tensor([len(plans[0]), steps], device=rt.device), op=dist.ReduceOp.MIN)
            check_at = lora_check_step(*(int(n) for n in shortest.tolist()), len(plans))
        slots = AdapterSlots(row, in_flight, s.ttt_lora_beta1, layout.reset_spans(s.ttt_lora_reset))
        chunk, slot = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
        done_work, marks, i = 0, {}, 0
        for phase, plan in enumerate(plans):
            for batch in plan:
                fresh = batch[chunk[batch] == 0]
                if len(fresh):
                    slot[fresh] = slots.open(len(fresh))
                done_work += lora_step(starts[batch], lengths[batch], chunk[batch], slot[batch], slots, layout, loss_fn,
                                       tokens, s, tables, scores, hints)
                chunk[batch] += 1
                slots.close(slot[batch[chunk[batch] >= counts[batch]]])
                timer.mark(i)
                if budget is not None and i in (0, check_at):
                    rt.sync()
                    marks[i] = (time.perf_counter() - t0, done_work)
                    if i == check_at and check_at >= 1:
                        (t_a, w_a), (t_b, w_b) = marks[0], marks[check_at]
                        rate = (t_b - t_a) / max(w_b - w_a, 1)
                        lora_estimate = lora_early_estimate(budget, rt, timer, shapes, check_at, t_a, t_b,
                                                            rate * (rank_work - w_a))
                        budget.check("ttt_lora", lora_estimate + (phased.estimate(budget, rate) if phased else 0.0),
                                     t_a)
                i += 1
            if phase < len(boundaries):
                phased.train(phase, tokens, scores)
                timer.mark()  # the SGD's seconds are not the next step's
                if phase == 0 and lora_estimate is not None:  # again, with the SGD's own measured rate
                    budget.check("ttt_lora", lora_estimate + phased.estimate(budget, rate), marks[0][0])
    if s.compile:  # 1 unless a shape slipped past lora_losses: each extra graph is a full recompile
        rt.log(f"ttt:lora graphs_compiled:{torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs_before}")
    rt.log(f"ttt:score_first_guard status:active checks:{scores.guard_checks} "
           f"targets_scored:{int(scores.scored.sum())}")
    result = scores.result(rt, time.perf_counter() - t0, record)
    seconds = result.seconds
    first_seconds, first_work = marks.get(0, (0.0, 0))  # the first step carries the compile: rates leave it out
    sgd_seconds = phased.seconds if phased else 0.0
    peak = ""
    if rt.device.type == "cuda":
        peak = f" peak_memory_gib:{torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f}"
    lora_tokens_per_s = (done_work - first_work) / max(seconds - first_seconds - sgd_seconds, 1e-9)
    rt.log(f"ttt:lora rank:0 steps:{steps} window_tokens:{done_work} "
           f"window_tokens_per_target:{done_work / max(sum(int(lengths[a:b].sum()) for a, b in shares), 1):.2f} "
           f"window_tokens_per_s_after_first_step:{lora_tokens_per_s:.0f}{peak}")
    rt.log(lora_step_costs(timer, shapes))
    if budget is not None:
        unscaled = (sgd_seconds, phased.estimate(budget, 1 / max(lora_tokens_per_s, 1e-9))) if phased else (0.0, 0.0)
        budget.finish("ttt_lora", seconds, first_seconds, result.targets, unscaled)
    return result


@contextlib.contextmanager
def attention_without_cudnn():
    """SDPA's cuDNN backend builds an execution plan for every new shape: right for the fixed shapes of
    training, ruinous for LoRA TTT, whose batch shape changes almost every step. Flash attention instead."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def lora_losses(base: GPT, layout: LoRALayout, s: Settings):
    """loss_fn(x [R, W], y [R, C], matrices) -> NLL [R, C] of the LoRA-adapted model, compiled once for
    every batch: the rows R and the window width W are symbolic (marked dynamic), everything else static.
    Duck sizing is off while it traces: a first window exactly one chunk wide (W == C) would otherwise tie
    W to C, and every wider window would recompile the whole forward and backward. One row is never
    traced (lora_step pads it to two), as dynamo specialises a size of 1.
    The RoPE tables are computed here, outside the graph, and go in as inputs: inside it, the NTK stretch's
    `W > TRAIN_SEQ_LEN` would be a guard on the symbolic W, and windows on either side of TRAIN_SEQ_LEN
    would compile the whole forward and backward twice (283 s of warm-up instead of one graph's share, on
    an H100 with EVAL_SEQ_LEN 2560, 2026-12-06)."""
    def losses(x, y, matrices, cos, sin, hints=None):
        return base.token_losses(x, y, lora=DocLoRA(layout, matrices), one_document_per_row=True, hints=hints,
                                 rope=(cos, sin))

    def rope_for(x):  # a handful of small kernels per step; caching every width would hold ~100 MB at 2560
        return rope_tables(x.size(1), s.rope_dims, s.rope_base, s.train_seq_len, x.device, compute_dtype(x.device))
    if not s.compile:
        return lambda x, y, matrices, *hints: losses(x, y, matrices, *rope_for(x), *hints)
    graph = compiled(losses, s.compile, dynamic=None)

    def compiled_losses(x, y, matrices, *hints):
        cos, sin = rope_for(x)
        torch._dynamo.mark_dynamic(x, (0, 1))
        for t in [y, cos, sin, *hints] + matrices:
            torch._dynamo.mark_dynamic(t, 0)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return graph(x, y, matrices, cos, sin, *hints)
    return compiled_losses


def warm_up_lora(loss_fn, layout: LoRALayout, row, s: Settings, rt: Runtime, vocab: int, tilted: bool = False):
    """Compile the LoRA forward/backward on random tokens (no validation data; random hints when tilted),
    then run it on growing and full windows, two rows and one (padded), so that any shape the compile did
    not cover shows up here."""
    t0 = time.perf_counter()
    chunks = LoRAChunks.of(s)
    full = chunks.first_full()
    n = int(chunks.end(full + 1))  # the document's length: one chunk after the first full window
    tokens = random_tokens((n + 1,), vocab, s, rt.device).to(torch.int32)
    tables = ByteTables(*(torch.zeros(vocab, dtype=d, device=rt.device) for d in (torch.int32, torch.bool, torch.bool)))
    hints = random_tokens(tokens.shape, vocab, s, rt.device).to(torch.int32) if tilted else None  # as ngram_hints
    slots = AdapterSlots(row, 2, s.ttt_lora_beta1)
    for rows in (2, 1):
        for chunk in sorted({0, min(1, full), full}):
            lora_step(np.zeros(rows, np.int64), np.full(rows, n), np.full(rows, chunk), np.arange(rows), slots, layout,
                      loss_fn, tokens, s, tables, Scores(rt.device, n_targets=len(tokens) - 1), hints)
    rt.sync()
    rt.log(f"ttt:warmup data:random_tokens seconds:{time.perf_counter() - t0:.1f}")


# --- all passes, checkpoints ------------------------------------------------------------------------


def enabled_passes(s: Settings) -> list:
    """The passes after training: the plain (non-overlapping) round trip of the artifact, then the
    sliding window and TTT as enabled."""
    return (["plain"] + (["sliding"] if s.sliding_window_enabled else [])
            + ([f"ttt_{s.ttt_mode}"] if s.ttt_enabled else []))


def run_evaluation_passes(model: GPT, s: Settings, rt: Runtime, data: EvalData, passes=None,
                          label_prefix: str = "quantized") -> dict:
    """Run the evaluation passes on model (the one rebuilt from the artifact): non-overlapping, sliding
    window, then TTT, as enabled. Each is timed and counted against the eval budget; TTT works on a
    copy, so model is left as it was. Returns {pass: EvalResult}."""
    passes = enabled_passes(s) if passes is None else passes
    if not passes:
        return {}
    tokens, tables = data.val_tokens, data.tables
    n_targets = len(tokens) - 1
    budget = EvalBudget(s, rt, n_targets)
    allow_recompiles()
    was_training = model.training
    model.eval()
    labels = {"plain": label_prefix, "sliding": f"{label_prefix}_sliding_window",
              "ttt_chunk": f"{label_prefix}_ttt_chunk", "ttt_lora": f"{label_prefix}_ttt_lora"}
    results = {}
    t0 = time.perf_counter()
    # the plain pass stays untilted: it is the round trip whose difference to pre-quantization is the tax
    hints = prepare_ngram_hints(s, rt, tokens, budget) if set(passes) - {"plain"} else None
    for name in passes:
        if name in ("plain", "sliding"):
            def losses(x, y, hints=None):
                return model.token_losses(x, y, hints=hints)
            batch = val_batch_seqs(s, rt) if name == "plain" else s.eval_batch_windows
            stride = s.eval_seq_len if name == "plain" else s.eval_stride
            result = evaluate_windows(compiled(losses, s.compile), tokens, tables, s.eval_seq_len, stride, batch, rt, budget,
                                      name, hints=None if name == "plain" else hints)
        elif name == "ttt_chunk":
            result = evaluate_ttt_chunk(model, s, rt, tokens, tables, budget, hints=hints)
        elif name == "ttt_lora":
            result = evaluate_ttt_lora(model, s, rt, tokens, tables, data.bos_id, budget, hints=hints)
        else:
            raise ValueError(f"unknown evaluation pass {name}")
        if result.targets != n_targets:
            raise RuntimeError(f"{name} scored {result.targets} targets, not the {n_targets} of the validation stream")
        result.estimated_8gpu_seconds = budget.done[-1][2]
        rt.log(result.log_line(labels[name]))
        require_finite(result.bpb, f"{labels[name]} val_bpb", s)
        results[name] = result
    model.train(was_training)
    seconds = time.perf_counter() - t0
    ttt = [n for n in passes if n.startswith("ttt_")]
    if ttt:
        r = results[ttt[-1]]
        rt.log(f"{r.log_line('final_ttt')} mode:{ttt[-1][4:]}")
    rt.log(f"eval_total_time:{1000 * seconds:.0f}ms passes:{','.join(passes) or 'none'}")
    budget.summary(seconds)
    return results


# =================================================================================================
# TRAINING: compile warm-up, the wallclock-capped loop
# =================================================================================================

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def peak_flops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def seed_everything(seed: int):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StepClock:
    """When the ranks look at the clock and at the loss, so that a training step never waits for the GPU.

    A check (every CLOCK_CHECK_EVERY steps, on logged steps, and on every step once the cap is near) waits
    for the GPU, then agrees on the elapsed training time (the max over ranks) and on whether any loss since
    the last check was NaN/inf (a flag kept on the device in between, so reading it costs no extra sync).
    Between checks the time is extrapolated from the last agreed step time, identically on every rank, so
    the LR schedule and the loop switch stay in lockstep. Consequences, by design: the wallclock stop is
    exact (checks run every step once the next one could cross the cap), and a divergence is reported at
    most CLOCK_CHECK_EVERY steps after the step that produced it."""

    def __init__(self, s: Settings, rt: Runtime, cap_ms: float):
        self.s, self.rt, self.cap_ms = s, rt, cap_ms
        self.agreed_ms, self.agreed_step, self.ms_per_step, self.checks = 0.0, 0, 0.0, 0
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=rt.device)

    def estimate_ms(self, step: int) -> float:
        return self.agreed_ms + (step - self.agreed_step) * self.ms_per_step

    def watch_loss(self, loss: torch.Tensor):
        self.bad_loss |= ~torch.isfinite(loss.detach())

    def due(self, step: int) -> bool:
        """After `step` steps: check now? Yes every CLOCK_CHECK_EVERY steps, and whenever the next step could
        reach the cap even if the steps since the last check ran 10% slower than the last agreed pace."""
        next_ms = self.agreed_ms + 1.1 * (step + 1 - self.agreed_step) * self.ms_per_step
        near_cap = math.isfinite(self.cap_ms) and (next_ms >= self.cap_ms or self.ms_per_step == 0)
        return step % self.s.clock_check_every == 0 or near_cap

    def agree(self, step: int, elapsed_ms_now) -> float:
        """Wait for the GPU, agree on the clock and the loss flag; returns the agreed elapsed ms.

        elapsed_ms_now() is called after the wait. Read before it, the time would be that of the host queuing
        step `step`, up to a step or two before the GPU finishes it: the wallclock stop would come that much
        late, and the logged rates would be wrong (4M tokens/s and 118% MFU at step 2 of a proxy run)."""
        self.rt.sync()
        shared = torch.stack((torch.tensor(elapsed_ms_now(), device=self.rt.device), self.bad_loss.float()))
        self.rt.all_reduce(shared, op=dist.ReduceOp.MAX)
        elapsed_ms, bad = shared.tolist()
        if bad > 0:
            raise UserError(f"training loss became NaN or infinite between steps {self.agreed_step + 1} and {step}: "
                            "the run diverged; lower MATRIX_LR, TIED_EMBED_LR or SCALAR_LR, or check the training "
                            "shards")
        if step > self.agreed_step:
            self.ms_per_step = (elapsed_ms - self.agreed_ms) / (step - self.agreed_step)
        self.agreed_ms, self.agreed_step, self.checks = elapsed_ms, step, self.checks + 1
        return elapsed_ms


def log_data_passes(rt: Runtime, tokens_read: int, train_tokens: int):
    """How many times over the run read its training data. A record run on 8xH100 reads about 3.5B of the
    8B SP8192 training tokens, each once; a long run on small data (the 32.8M-token proxy: 4 minutes on one
    GPU read it 5.3 times, 2026-12-06) repeats them, and what wins there can be what fits repeated text
    best, not what the challenge rewards. The warning says so in the log that holds the figures."""
    passes = tokens_read / train_tokens
    rt.log(f"training_data tokens_read:{tokens_read} train_tokens:{train_tokens} passes:{passes:.2f}")
    if passes > 1:
        rt.log(f"WARNING: training read its {train_tokens:,} tokens {passes:.1f} times over; a run that repeats "
               f"its data can rank settings differently from a challenge run, which reads about 3.5B of the "
               f"8B SP8192 training tokens once")


class Trainer:
    """The model being trained, its compiled callables, the training shards and the validation data."""

    def __init__(self, s: Settings, rt: Runtime, data: EvalData | None = None):
        self.s, self.rt = s, rt
        seed_everything(s.seed)
        self.data = load_eval_data(s, rt) if data is None else data
        self.train_files = shard_files(s.data_path, "train")
        self.model = GPT(s).to(rt.device)
        self.attention_backend = self.model.use_attention(s.attn_backend, rt.device, self.data.bos_id)
        self.train_loss = compiled(self.model, s.compile, mode=s.compile_mode)
        self.eval_losses = compiled(self.model.token_losses, s.compile)
        self.global_seqs = s.train_batch_tokens // s.train_seq_len
        self.seq_phases = seq_schedule(s)  # ((start fraction, length), ...); one phase at TRAIN_SEQ_LEN when off
        self.can_loop = s.num_loops > 0
        self.reserve = s.gptq_reserve_seconds  # train() replaces 0 (measured) by the measured reserve
        self.warmup_seconds = 0.0  # compile_warmup's wall time

    def new_loader(self, seq_len: int = 0) -> TrainLoader:
        """A fresh loader of windows of seq_len (default TRAIN_SEQ_LEN), TRAIN_BATCH_TOKENS a step."""
        seq_len = seq_len or self.s.train_seq_len
        return TrainLoader(self.train_files, seq_len, self.s.train_batch_tokens // seq_len, self.s.seed,
                           self.rt.rank, self.rt.world_size, self.rt.grad_accum, self.s.vocab_size)

    def fetch(self, loader: TrainLoader):
        batches = loader.next_step()
        return [b.pin_memory() for b in batches] if self.rt.device.type == "cuda" else batches

    def document_boundaries(self, batch):
        """cu_seqlens of a host micro-batch's inputs on the device when a varlen kernel trains, else None. Found
        on the host and copied from pinned memory: no device sync. Marked dynamic, so that each new count of
        documents reuses the one compiled graph."""
        if self.model.varlen_attention is None:
            return None
        cu_seqlens = document_cu_seqlens(batch[:, :-1], self.model.bos_id)
        if self.rt.device.type == "cuda":
            cu_seqlens = cu_seqlens.pin_memory().to(self.rt.device, non_blocking=True)
        torch._dynamo.mark_dynamic(cu_seqlens, 0)
        return cu_seqlens

    def forward_backward(self, batches) -> torch.Tensor:
        """Accumulate gradients over this rank's micro-batches; returns the mean loss (0-d tensor)."""
        total = torch.zeros((), device=self.rt.device)
        for batch in batches:
            cu_seqlens = self.document_boundaries(batch)
            batch = batch.to(self.rt.device, non_blocking=True)
            loss = self.train_loss(batch[:, :-1], batch[:, 1:], cu_seqlens)
            (loss / len(batches)).backward()
            total += loss.detach()
        return total / len(batches)

    def loop_due(self, step: int, frac: float) -> bool:
        """Depth recurrence switches on at ENABLE_LOOPING_AT_STEP when set, else at the budget fraction
        ENABLE_LOOPING_AT. Either way the looped graph was compiled in the warm-up, so the switch costs no
        compile inside the timed loop."""
        s = self.s
        return step >= s.enable_looping_at_step if s.enable_looping_at_step > 0 else frac >= s.enable_looping_at

    def validate(self) -> EvalResult:
        s, rt, data = self.s, self.rt, self.data
        return evaluate(self.model, self.eval_losses, data.val_tokens, data.tables, s.eval_seq_len,
                        val_batch_seqs(s, rt), rt)

    def warmup_graphs(self) -> list:
        """(looping, seq_len) of every training graph the timed loop can meet, the unlooped ones first.

        The training step compiles with static shapes, so each window length is a graph of its own, in
        each recurrence state. Both switches are one-way and read the same training fraction: at any step
        the loop is in the TRAIN_SEQ_SCHEDULE phase i whose [start_i, start_i+1) holds the running maximum M
        of the fraction so far, and loops once M >= ENABLE_LOOPING_AT. So phase i can run unlooped only if
        start_i < ENABLE_LOOPING_AT, and looped only if it ends after ENABLE_LOOPING_AT (the last phase
        never ends). ENABLE_LOOPING_AT_STEP switches by step count instead: every combination can run."""
        s, phases = self.s, self.seq_phases
        if not self.can_loop:
            return [(False, length) for _, length in phases]
        by_step = s.enable_looping_at_step > 0
        ends = [start for start, _ in phases[1:]] + [math.inf]
        unlooped = [(False, length) for start, length in phases if by_step or start < s.enable_looping_at]
        looped = [(True, length) for (_, length), end in zip(phases, ends) if by_step or end > s.enable_looping_at]
        return unlooped + looped

    def compile_warmup(self):
        """Run WARMUP_STEPS real steps in every graph of warmup_graphs (looping off, then on, each at every
        TRAIN_SEQ_SCHEDULE length it can meet), then roll the weights back; the caller builds fresh optimizers
        and loader. A compile inside the timed loop would spend the training budget (tens of seconds a graph
        on the GPU), so a recurrence or length switch there must find its graph compiled already."""
        s, rt = self.s, self.rt
        if s.warmup_steps <= 0:
            return
        initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        graphs = self.warmup_graphs()
        optimizers, loader = Optimizers(self.model, s, rt), self.new_loader(graphs[0][1])
        t0 = time.perf_counter()
        for looping, seq_len in graphs:
            if seq_len != loader.seq_len:
                loader.set_seq_len(seq_len, s.train_batch_tokens // seq_len)
            if len(self.seq_phases) > 1:
                rt.log(f"warmup:graph looping:{int(looping)} seq_len:{seq_len} seqs_per_step:{loader.global_seqs}")
            if looping and not self.model.looping:
                rt.log(f"loop_warmup:enabled schedule:{schedule_text(self.model.schedule())}")
            self.model.looping = looping
            for k in range(s.warmup_steps):
                self.forward_backward(self.fetch(loader))
                optimizers.step(k, 1.0)
                optimizers.zero_grad()
                if k + 1 == s.warmup_steps or (k + 1) % 10 == 0:
                    rt.log(f"{'loop_warmup_step' if looping else 'warmup_step'}:{k + 1}/{s.warmup_steps}")
        with torch.no_grad():
            self.model.load_state_dict(initial)
        self.model.looping = False
        rt.sync()
        self.warmup_seconds = time.perf_counter() - t0
        rt.log(f"warmup:done seconds:{self.warmup_seconds:.1f} timed:0 weights:rolled_back")

    def train(self) -> dict:
        s, rt, model = self.s, self.rt, self.model
        self.compile_warmup()
        phase, seq_len = 0, self.seq_phases[0][1]  # TRAIN_SEQ_SCHEDULE phase (TRAIN_SEQ_LEN throughout when off)
        optimizers, loader = Optimizers(model, s, rt), self.new_loader(seq_len)
        if len(self.seq_phases) > 1:
            for _, length in self.seq_phases[1:]:  # before any training time is spent
                loader.require_batch(length, s.train_batch_tokens // length)
            rt.log(f"seq_len:schedule {s.train_seq_schedule} step:0 seq_len:{seq_len} "
                   f"seqs_per_step:{loader.global_seqs}")
        ema = EMA(model, s.ema_decay, s.ema_warmup) if s.ema_decay > 0 else None
        cap_ms, reserve = math.inf, s.gptq_reserve_seconds
        if s.max_wallclock_seconds > 0 and reserve == 0:
            reserve, how = calibration_reserve(self)
            rt.log(f"gptq:reserve seconds:{reserve:.1f} of_budget:{100 * reserve / s.max_wallclock_seconds:.0f}% "
                   f"batches:{s.gptq_calibration_batches} calibration:{how}")
            if reserve >= s.max_wallclock_seconds:
                raise UserError(f"GPTQ calibration ({s.gptq_calibration}, {s.gptq_calibration_batches} batches) is "
                                f"projected to take {reserve:.0f}s, the whole MAX_WALLCLOCK_SECONDS="
                                f"{s.max_wallclock_seconds:.0f}: lower GPTQ_CALIBRATION_BATCHES, use "
                                f"GPTQ_CALIBRATION=train, or set GPTQ_RESERVE_SECONDS to count it outside")
        self.reserve = reserve
        if s.max_wallclock_seconds > 0:
            cap_ms = (s.max_wallclock_seconds - reserve) * 1000.0
        if math.isfinite(cap_ms):
            rt.log(f"wallclock:budget seconds:{s.max_wallclock_seconds:.0f} "
                   f"gptq_reserve_seconds:{reserve:.0f} "
                   f"training_cap_ms:{cap_ms:.0f}")
        tokens_per_step = self.global_seqs * s.train_seq_len  # = TRAIN_BATCH_TOKENS at every scheduled length
        peak = peak_flops(rt.device)
        prefetch = ThreadPoolExecutor(max_workers=1)
        next_batches = prefetch.submit(self.fetch, loader)
        clock = StepClock(s, rt, cap_ms)
        training_ms, step, stop_reason = 0.0, 0, None
        last_log = (0, 0.0)
        history = []
        rt.sync()
        t0 = time.perf_counter()
        while True:
            done = stop_reason is not None or step >= s.iterations
            if done or (s.val_loss_every > 0 and step > 0 and step % s.val_loss_every == 0):
                rt.sync()
                training_ms += 1000.0 * (time.perf_counter() - t0)  # the clock pauses while validating
                val = self.validate()
                rt.log(f"step:{step}/{s.iterations} val_loss:{val.loss:.4f} val_bpb:{val.bpb:.4f} "
                       f"train_time:{training_ms:.0f}ms")
                rt.sync()
                t0 = time.perf_counter()
            if done:
                break
            frac = clock.estimate_ms(step) / cap_ms if math.isfinite(cap_ms) else step / s.iterations
            if self.can_loop and not model.looping and self.loop_due(step, frac):
                model.start_looping()
                if ema is not None and model.loop_mlps is not None:  # copied in just now: average from here
                    ema.restart(model.loop_mlps.parameters())
                rt.log(f"layer_loop:enabled step:{step} frac:{frac:.3f} train_time:{clock.estimate_ms(step):.0f}ms "
                       f"schedule:{schedule_text(model.schedule())}")
            due = schedule_phase(self.seq_phases, frac)
            if due > phase:  # one-way, like the recurrence switch; its graph was compiled in the warm-up
                phase, seq_len = due, self.seq_phases[due][1]
                next_batches.result()  # prefetched at the old length: let it finish, then give its windows back
                loader.set_seq_len(seq_len, s.train_batch_tokens // seq_len, unread_steps=1)
                next_batches = prefetch.submit(self.fetch, loader)
                rt.log(f"seq_len:switched step:{step} frac:{frac:.3f} seq_len:{seq_len} "
                       f"seqs_per_step:{loader.global_seqs} train_time:{clock.estimate_ms(step):.0f}ms")
            batches = next_batches.result()
            next_batches = prefetch.submit(self.fetch, loader)
            loss = self.forward_backward(batches)
            optimizers.step(step, lr_multiplier(frac, s.warmdown_frac, s.min_lr))
            optimizers.zero_grad()
            if ema is not None:
                ema.update()
            clock.watch_loss(loss)
            step += 1
            log_step = step <= 5 or step % s.train_log_every == 0 or step == s.iterations
            if log_step or clock.due(step):
                elapsed_ms = clock.agree(step, lambda: training_ms + 1000.0 * (time.perf_counter() - t0))
                if elapsed_ms >= cap_ms:
                    stop_reason = "wallclock_cap"
            if log_step or stop_reason:
                mean_loss = rt.all_reduce(loss.detach().clone()).item() / rt.world_size
                tok_s = (step - last_log[0]) * tokens_per_step / max((elapsed_ms - last_log[1]) / 1000.0, 1e-9)
                mfu = ""
                if peak:
                    flops = tok_s * model.matmul_flops_per_token(seq_len)
                    mfu = f" mfu:{100 * flops / (peak * rt.world_size):.1f}%"
                rt.log(f"step:{step}/{s.iterations} train_loss:{mean_loss:.4f} train_time:{elapsed_ms:.0f}ms "
                       f"step_avg:{elapsed_ms / step:.2f}ms tok/s:{tok_s:.0f}{mfu} looping:{int(model.looping)}")
                history.append({"step": step, "train_loss": mean_loss, "tok_s": tok_s, "looping": model.looping,
                                "seq_len": seq_len})
                last_log = (step, elapsed_ms)
        elapsed_ms = clock.agreed_ms
        rt.log(f"clock:checks count:{clock.checks} every:{s.clock_check_every} steps:{step}")
        prefetch.shutdown(wait=True)
        log_data_passes(rt, step * tokens_per_step, loader.total_tokens)
        if stop_reason:
            rt.log(f"stopping_early:{stop_reason} train_time:{elapsed_ms:.0f}ms step:{step}/{s.iterations}")
        if rt.device.type == "cuda":
            rt.log(f"peak_memory allocated_mib:{torch.cuda.max_memory_allocated(rt.device) // 2**20} "
                   f"reserved_mib:{torch.cuda.max_memory_reserved(rt.device) // 2**20}")
        if ema is not None:
            ema.copy_to_model()
            rt.log(f"ema:applied decay:{s.ema_decay}" + (f" warmup:1 updates:{ema.updates}" if s.ema_warmup else ""))
        for line in model.lane_report():
            rt.log(line)
        return {"steps": step, "train_ms": elapsed_ms, "history": history, "warmup_seconds": self.warmup_seconds}


# =================================================================================================
# RUN DRIVER: one run from top to bottom
# =================================================================================================
# train_and_evaluate is the whole run: set-up and start-up checks -> training (or LOAD_CHECKPOINT) ->
# GPTQ calibration inside the training budget -> quantize and pack the artifact (rank 0) -> every rank
# rebuilds the model from that file -> the evaluation passes on it (plain round trip, sliding window,
# TTT). EVAL_ONLY (evaluate_artifact) is the same from the artifact on; --check (check_run) stops after
# the start-up checks. The sections above hold the parts; this one holds the order.


def require_finite(value: float, what: str, s: Settings):
    """A score that is NaN or infinite is a failed run, never a result."""
    if not math.isfinite(value):
        raise UserError(f"{what} is {value}: the model produced non-finite losses (MATRIX_BITS={s.matrix_bits}, "
                        f"EMBED_BITS={s.embed_bits}, learning rates and TTT settings are the usual suspects); "
                        f"the log {s.log_dir}/{s.run_id}.txt has the figures before it")


def checkpoint_settings(s: Settings) -> dict:
    return settings_with_role(s, "model")


def save_checkpoint(model: GPT, s: Settings, rt: Runtime, path: str):
    """The raw (unquantized) state dict and the settings that shape it."""
    if rt.master:
        import io
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        buffer = io.BytesIO()
        torch.save({"state_dict": state, "settings": checkpoint_settings(s)}, buffer)
        write_atomic(Path(path), buffer.getvalue())
        rt.log(f"checkpoint:saved path:{path}")


def load_checkpoint(model: GPT, s: Settings, rt: Runtime, path: str):
    if not Path(path).is_file():
        raise UserError(f"LOAD_CHECKPOINT={path} does not exist: make one with SAVE_CHECKPOINT=path")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    differ = [f"{k}={v} (run: {getattr(s, k.lower())})" for k, v in ckpt["settings"].items()
              if getattr(s, k.lower()) != v]
    if differ:
        raise UserError(f"checkpoint {path} was trained with other model settings: {', '.join(differ)}; "
                        f"set them to match")
    with torch.no_grad():
        model.load_state_dict(ckpt["state_dict"])
    rt.log(f"checkpoint:loaded path:{path}")


def calibrate(trainer: Trainer, train_ms: float) -> tuple:
    """(Hessians, figures): calibration on every rank, timed against the training budget."""
    s, rt, model = trainer.s, trainer.rt, trainer.model
    model.looping = trainer.can_loop  # calibrate the recurrent schedule the model is evaluated with
    with timed(rt) as hessian_time:
        if s.gptq_calibration == "selfgen":
            batches = selfgen_batches(model, s.gptq_calibration_batches, s.train_seq_len, s.vocab_size,
                                      s.seed + rt.rank, rt.device)
        else:
            batches = calibration_batches(trainer.new_loader(), s.gptq_calibration_batches)
        hessians = collect_hessians(model, batches, rt)
    seconds = hessian_time.seconds
    counted = train_ms / 1000.0 + seconds
    budget = f"{s.max_wallclock_seconds:.0f}s" if s.max_wallclock_seconds > 0 else "none"
    micro_seqs = trainer.global_seqs // (rt.world_size * rt.grad_accum)
    sequences = s.gptq_calibration_batches * rt.world_size * (1 if s.gptq_calibration == "selfgen" else micro_seqs)
    rt.log(f"gptq:hessians batches:{s.gptq_calibration_batches} tokens:{sequences * s.train_seq_len} "
           f"calibration:{s.gptq_calibration} seconds:{seconds:.1f} train+calibration:{counted:.1f}s budget:{budget}")
    if 0 < s.max_wallclock_seconds < counted:
        rt.log(f"WARNING: training + GPTQ calibration took {counted:.1f}s, over MAX_WALLCLOCK_SECONDS="
               f"{s.max_wallclock_seconds:.0f}: raise GPTQ_RESERVE_SECONDS to at least "
               f"{math.ceil(trainer.reserve + counted - s.max_wallclock_seconds)} "
               f"or lower GPTQ_CALIBRATION_BATCHES")
    return hessians, {"hessian_seconds": seconds, "train_calibration_seconds": counted}


def quantize_and_pack(model: GPT, hessians: dict, s: Settings, rt: Runtime) -> dict:
    """GPTQ and the artifact file (rank 0) -> accounting; fails with a UserError before any evaluation
    if the artifact is over ARTIFACT_LIMIT_BYTES. Returns the figures and the path every rank reads."""
    path = artifact_path(s)
    out = {}
    over = torch.zeros((), device=rt.device)
    if rt.master:
        blob, parts = build_artifact(model, hessians, s, rt)
        write_atomic(path, blob)
        out.update(artifact_accounting(len(blob), code_bytes(s), s.artifact_limit_bytes), artifact_parts=parts)
        rt.log(f"artifact: model_bytes:{out['model_bytes']} code_bytes:{out['code_bytes']} "
               f"total:{out['artifact_bytes']} limit:{s.artifact_limit_bytes} margin:{out['margin']} path:{path} "
               f"code_from:{s.code_bytes_from}")
        over.fill_(float(out["margin"] < 0))
    if rt.all_reduce(over, op=dist.ReduceOp.MAX).item() > 0:
        if not rt.master:
            raise UserError("the artifact is over ARTIFACT_LIMIT_BYTES (rank 0 reports the details)")
        largest = sorted(out["artifact_parts"].items(), key=lambda kv: -kv[1])[:5]
        raise UserError(f"artifact {path}: {out['model_bytes']} model + {out['code_bytes']} code = "
                        f"{out['artifact_bytes']} bytes, {-out['margin']} over ARTIFACT_LIMIT_BYTES="
                        f"{s.artifact_limit_bytes}; largest compressed parts: "
                        + ", ".join(f"{n} {b}" for n, b in largest)
                        + "; lower MATRIX_CLIP_SIGMAS/EMBED_CLIP_SIGMAS or MATRIX_BITS/EMBED_BITS, or shrink the model")
    if rt.distributed:  # ranks may have drawn different default RUN_IDs: all read rank 0's file (one host)
        shared = [str(path)]
        dist.broadcast_object_list(shared, src=0)
        path = Path(shared[0])
    out["artifact_path"] = str(path)
    return out


def score_artifact(path, s: Settings, rt: Runtime, data: EvalData, qstate=None) -> dict:
    """Every rank rebuilds a fresh GPT from the artifact alone and runs the evaluation passes on it;
    the plain pass is the round trip (`quantized ... val_bpb`). Returns the figures."""
    if qstate is None:
        qstate, _, _ = read_artifact(path)
    model = model_from_artifact(qstate, s, rt, str(path), data.bos_id)
    passes = run_evaluation_passes(model, s, rt, data)
    final = list(passes.values())[-1]
    rt.log(f"final val_bpb:{final.bpb:.8f}")
    require_finite(final.bpb, "final val_bpb", s)
    return {"quantized_model": model, "quantized_val_loss": passes["plain"].loss,
            "quantized_val_bpb": passes["plain"].bpb, "eval": passes, "final_val_bpb": final.bpb}


def use_tf32(rt: Runtime):
    if rt.device.type == "cuda":  # training, the round trip and EVAL_ONLY all run with the same numerics
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def needs_no_mix_order_reduction(s: Settings) -> bool:
    """Whether the model has a component of PR #1204's system (bigram hash, SmearGate, value embeddings,
    untied loop MLPs, attention-off layers). With them, torch 2.11's inductor failed an assertion in its
    scheduler (`not isinstance(node1, FusedMixOrderReductions)`) compiling the first backward of
    PRESET=pr1204 on the H200 (2026-12-03); with its mix-order reduction fusion off the same run compiled
    and trained. Only these models turn it off, so the measured default path keeps the fusion."""
    return bool(s.bigram_hash_buckets or s.smear_gate or s.value_embed_layers or s.untie_loop_mlp
                or s.attn_off_layers)


def inductor_workarounds(s: Settings, rt: Runtime):
    if s.compile and needs_no_mix_order_reduction(s):
        import torch._inductor.config as inductor_config
        inductor_config.triton.mix_order_reduction = False
        rt.log("compile:workaround inductor.triton.mix_order_reduction:off reason:pr1204_components")


def train_and_evaluate(s: Settings, rt: Runtime) -> dict:
    """The whole run; returns the figures it logged (tests call this in-process). Its last line,
    `run_phases`, says where the wall time went, untimed parts included (start-up, compile warm-up, the
    passes after training), so a short experiment shows what besides training it pays for."""
    phases, phase_start = {}, time.perf_counter()

    def phase_done(name: str):
        nonlocal phase_start
        now = time.perf_counter()
        phases[name] = now - phase_start
        phase_start = now
    log_header(s, rt)
    use_tf32(rt)
    inductor_workarounds(s, rt)
    data = load_eval_data(s, rt)
    trainer = Trainer(s, rt, data)
    model = trainer.model
    rt.log(f"data train_shards:{len(trainer.train_files)} val_tokens:{len(data.val_tokens) - 1}")
    check_evaluation_setup(s, rt, data)
    rt.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    check_artifact_estimate(model, s, rt)
    rt.log(f"attention_backend:{trainer.attention_backend}")
    rt.log(f"mlp_kernel:{model.mlp_kernel}")
    rt.log(f"loss_kernel:{model.loss_kernel}")
    rt.log(f"qk_kernel:{model.qk_kernel}")
    rt.log(f"parallel_residual mode:{s.parallel_residual_mode} start_layer:{s.parallel_residual_start}")
    rt.log(f"depth_recurrence num_loops:{s.num_loops} segment:{s.loop_start}-{s.loop_end} "
           f"enable_at:{s.enable_looping_at}")
    phase_done("setup")
    rt.past_setup = True
    # 1. train (or load a checkpoint)
    if s.load_checkpoint:
        load_checkpoint(model, s, rt, s.load_checkpoint)
        results = {"steps": 0, "train_ms": 0.0, "history": [], "warmup_seconds": 0.0}
    else:
        results = trainer.train()
        if trainer.can_loop and not model.looping:  # the switch never came (a short run): evaluation loops anyway,
            model.start_looping()                    # with untied loop MLPs copied as the switch would have
            rt.log(f"layer_loop:evaluation_only steps:{results['steps']} "
                   f"untied_mlps:{'copied' if model.loop_mlps is not None else 'none'}")
    if s.save_checkpoint:
        save_checkpoint(model, s, rt, s.save_checkpoint)
    phase_done("train")  # the compile warm-up, the timed loop and the EMA
    model.looping = trainer.can_loop  # evaluation always runs the full recurrent schedule
    val = trainer.validate()
    rt.log(val.log_line("pre-quantization post-ema"))
    require_finite(val.bpb, "pre-quantization val_bpb", s)
    results.update(val_loss=val.loss, val_bpb=val.bpb, trainer=trainer)
    phase_done("validate")
    # 2. calibrate inside the training budget, 3. quantize and pack
    hessians, figures = calibrate(trainer, results["train_ms"])
    results.update(figures)
    phase_done("calibrate")
    results.update(quantize_and_pack(model, hessians, s, rt))
    phase_done("pack")
    # 4. the score: every pass on the model rebuilt from the artifact alone
    results.update(score_artifact(results["artifact_path"], s, rt, data))
    rt.log(f"quantization_tax bpb:{results['quantized_val_bpb'] - val.bpb:+.8f}")
    phase_done("score")
    total = sum(phases.values())
    rt.log("run_phases " + " ".join(f"{name}_s:{seconds:.1f}" for name, seconds in phases.items()) +
           f" total_s:{total:.1f} warmup_s:{results['warmup_seconds']:.1f} loop_s:{results['train_ms'] / 1000:.1f}")
    results["run_phases"] = dict(phases, total=total)
    return results


def load_artifact_settings(s: Settings, rt: Runtime, path: str) -> tuple:
    """(qstate, settings): the artifact and the settings it was made with (see adopt_artifact_settings),
    logged in the header so that the log tells what was scored."""
    qstate, stored, model_bytes = read_artifact(path)
    s, notes = adopt_artifact_settings(s, stored, os.environ)
    s.validate(rt.world_size)
    log_header(s, rt)
    for note in notes:
        rt.log(note)
    rt.log(f"eval_only: artifact:{path} model_bytes:{model_bytes}")
    return qstate, s


def evaluate_artifact(s: Settings, rt: Runtime) -> dict:
    """EVAL_ONLY: score an artifact alone (tokenizer and validation shards only, never a training shard).
    With the same GPU count it reproduces the training run's figures bit for bit: the model and score
    settings come from the artifact; COMPILE and ATTN_BACKEND are the machine's."""
    qstate, s = load_artifact_settings(s, rt, s.eval_only)
    use_tf32(rt)
    inductor_workarounds(s, rt)
    data = load_eval_data(s, rt)
    check_evaluation_setup(s, rt, data)
    rt.past_setup = True
    return score_artifact(s.eval_only, s, rt, data, qstate)


def check_run(s: Settings, rt: Runtime):
    """--check: every start-up check of a real run (settings, output paths, tokenizer, shard headers,
    validation ids, byte tables, evaluation settings), then exit without training or writing anything."""
    if s.eval_only:
        _, s = load_artifact_settings(s, rt, s.eval_only)
        check_evaluation_setup(s, rt, load_eval_data(s, rt))
    else:
        trainer = Trainer(s, rt)
        check_evaluation_setup(s, rt, trainer.data)
        check_artifact_estimate(trainer.model, s, rt)
        if s.load_checkpoint:
            load_checkpoint(trainer.model, s, rt, s.load_checkpoint)
    rt.log(f"check:ok run_id:{s.run_id} checked:settings,paths,tokenizer,shards,evaluation written:nothing")


def main():
    rt, finished = None, False
    dry_run = "--check" in sys.argv[1:]
    unknown = [a for a in sys.argv[1:] if a != "--check"]
    try:
        if unknown:
            raise UserError(f"unknown argument {unknown[0]}: train_gpt.py takes its settings from environment "
                            f"variables (see README.md); its only flag is --check")
        settings = Settings()
        rt = Runtime(settings, dry_run=dry_run)
        if dry_run:
            check_run(settings, rt)
        elif settings.eval_only:
            evaluate_artifact(settings, rt)
        else:
            train_and_evaluate(settings, rt)
        finished = True
    except UserError as e:
        # Rank 0 speaks for errors every rank finds the same way, so torchrun users read it once.
        if e.rank_local or (rt.master if rt is not None else os.environ.get("RANK", "0") == "0"):
            print(f"error: {e}", file=sys.stderr, flush=True)
        if rt is not None:
            rt.discard_log_of_a_run_that_never_started()
        sys.exit(1)
    except Exception:
        if rt is not None:
            rt.log_failure(traceback.format_exc())
        raise
    finally:
        if rt is not None:
            rt.close(finished)
    if rt is not None and rt.distributed:
        # A finished distributed run leaves without the interpreter's finalization: gloo's objects destroyed
        # there made a rank abort ("terminate called without an active exception") in 3 of 16 two-process
        # CPU runs even after destroy_process_group (torch 2.13, 2026-12-07, without the barrier; with it, 1 of
        # 8 in CI); none in 20 with this exit. Every log line is already written and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

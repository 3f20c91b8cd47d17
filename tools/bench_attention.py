#!/usr/bin/env python3
"""Attention paths on this GPU, forward + backward of one layer at the training shape (a micro-batch of
TRAIN_BATCH_TOKENS/8 tokens in windows of TRAIN_SEQ_LEN, NUM_HEADS query and NUM_KV_HEADS key/value heads),
with the document boundaries of the real training shards (DATA_PATH) for the document-masked paths.

    python3 tools/bench_attention.py                 # every path this machine can run
    python3 tools/bench_attention.py --json out.json

Causal: SDPA as PyTorch picks it, SDPA forced to cuDNN / flash / memory-efficient, flex attention,
FlashAttention 3 when flash_attn_interface imports. Document mask: the project's kernels (train_gpt
bind_flex, bind_masked_sdpa: the block mask is rebuilt per forward, as in training, and that is timed too)
and the training step's varlen kernels over the documents (torch varlen; FA3's when it imports). Not a
test: the figures depend on the machine."""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def time_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / repeats


def forward_backward(attend, q, k, v):
    def step():
        out = attend(q, k, v)
        out.backward(torch.ones_like(out))
    return step


def training_windows(s, rows: int) -> torch.Tensor:
    """The first rows x (TRAIN_SEQ_LEN) tokens of the first training shard, as the loader would cut them."""
    tokens = tg.read_shard(tg.shard_files(s.data_path, "train")[0])[: rows * s.train_seq_len]
    return torch.from_numpy(tokens.astype(np.int64)).view(rows, s.train_seq_len)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    s = tg.Settings()
    dev = torch.device("cuda")
    B, T = s.train_batch_tokens // 8 // s.train_seq_len, s.train_seq_len
    H, Hkv, D = s.num_heads, s.num_kv_heads, s.model_dim // s.num_heads
    ids = training_windows(s, B).to(dev)
    sp = tg.load_tokenizer(s.tokenizer_path, s.vocab_size)
    bos = sp.bos_id()
    lengths = np.diff(np.flatnonzero(ids.flatten().cpu().numpy() == bos))
    print(f"shape B={B} T={T} H={H} Hkv={Hkv} D={D}; documents in the batch: {len(lengths) + 1}, "
          f"mean length {lengths.mean():.0f} tokens, median {np.median(lengths):.0f}")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (H, Hkv, Hkv))
    results = {}

    def measure(name, fn):
        try:
            results[name] = time_ms(fn)
        except Exception as e:  # a path this machine or this torch cannot run
            results[name] = None
            print(f"{name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")

    from torch.nn.attention import SDPBackend, sdpa_kernel
    causal = tg.bind_causal_sdpa(ids, bos)
    measure("causal sdpa (PyTorch's pick)", forward_backward(causal, q, k, v))
    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                           ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def forced(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return causal(q, k, v)
        measure(f"causal sdpa {label}", forward_backward(forced, q, k, v))
    fa3 = tg.fa3_causal()
    if fa3 is not None:
        measure("causal fa3", forward_backward(fa3(ids, bos), q, k, v))
    else:
        print("causal fa3: unavailable (flash_attn_interface does not import)")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled_flex = torch.compile(flex_attention)
    causal_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, B, None, T, T, device=dev)

    def flex_causal(q, k, v):
        return compiled_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=causal_mask,
                             enable_gqa=True).transpose(1, 2)
    measure("causal flex", forward_backward(flex_causal, q, k, v))
    # The project's document-masked kernel as training runs it: mask built from the ids inside the compiled graph.
    doc_flex = torch.compile(lambda ids, q, k, v: tg.bind_flex(ids, bos)(q, k, v))
    measure("docmask flex (mask built per call)", forward_backward(lambda q, k, v: doc_flex(ids, q, k, v), q, k, v))
    measure("docmask sdpa with a boolean mask",
            forward_backward(lambda q, k, v: tg.bind_masked_sdpa(ids, bos)(q, k, v), q, k, v))
    # The training step's varlen paths (ATTN_BACKEND=varlen / fa3 with DOC_MASK=1): boundaries found on the host,
    # the window length as the longest segment, K/V repeated only where the kernel takes no GQA.
    cu = tg.document_cu_seqlens(ids.cpu(), bos).to(dev)
    for label, kernel in (("docmask varlen (torch, ATTN_BACKEND=varlen)", tg.torch_varlen()),
                          ("docmask varlen (FA3, ATTN_BACKEND=fa3)", tg.fa3_varlen())):
        if kernel is None:
            print(f"{label}: unavailable (does not import)")
            continue
        measure(label, forward_backward(tg.bind_varlen(kernel, cu), q, k, v))
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}: ms per layer, forward + backward")
    for name, ms in results.items():
        print(f"  {name:40s} {'-' if ms is None else f'{ms:7.2f}'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

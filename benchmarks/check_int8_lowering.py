"""How Triton lowers the int8 GEMM kernels for a GPU architecture, without a GPU.

Compiles ``_int8_linear_kernel`` and ``_int8_conv_padded_kernel`` (``tfmq.runtime.kernels``) for a
target compute capability (default sm90, Hopper) with the launch-time specialisation a real call
gets (16-byte-aligned pointers, channel counts divisible by 16) and reports, per tile
configuration: which tensor-core instruction the dot became (``wgmma`` = Hopper's asynchronous
warpgroup MMA, ``mma.sync`` = Ampere's), how many asynchronous global->shared copies the
software pipeline issues (``cp.async``; 0 means the K loop is not pipelined), TMA use, and the
shared memory the kernel needs. Prints a table, writes JSON::

    python benchmarks/check_int8_lowering.py --json benchmarks/results/int8/lowering_sm90.json

Runs wherever Triton's CUDA backend (ptxas) is installed; the result depends on the Triton
version, which the JSON records.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tfmq.runtime.kernels import _int8_triton as T

PTR_TYPES = {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": "*bf16", "ws_ptr": "*i32", "sx_ptr": "*fp32",
             "zx_ptr": "*fp32", "ca_ptr": "*i32", "sel_ptr": "*i64", "sw_ptr": "*fp32", "cb_ptr": "*i32",
             "bsum_ptr": "*i32", "bias_ptr": "*bf16", "asum_ptr": "*i32", "psum_ptr": "*i32"}
INTS = {"M", "N", "K", "stride_am", "stride_bn", "stride_om", "Bsz", "HP", "WP", "CIN", "HO", "WO"}
DIVISIBLE = {"N", "K", "CIN", "stride_am", "stride_bn", "stride_om"}   # multiples of 16 at the SD / bundled shapes

KERNELS = {
    "linear": (T._int8_linear_kernel,
               dict(A_FLOAT=False, QMIN=0, QMAX=255, HAS_BIAS=True, HAS_SEL=True, HAS_ASUM=True, SPLIT_K=1)),
    "conv3x3 padded": (T._int8_conv_padded_kernel,
                       dict(KH=3, KW=3, STRIDE_H=1, STRIDE_W=1, HAS_BIAS=True, HAS_SEL=True, SPLIT_K=1,
                            EVEN_K=True)),
}


def lower(fn, consts: dict, cfg: triton.Config, arch: int) -> dict:
    names = fn.arg_names
    sig = {n: PTR_TYPES[n] if n.endswith("_ptr") else ("i32" if n in INTS else "constexpr") for n in names}
    consts = consts | cfg.kwargs
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n.endswith("_ptr") or n in DIVISIBLE}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = k.asm["ptx"]
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return {"wgmma": "wgmma.mma_async" in ptx, "wgmma_shapes": shapes, "mma_sync": "mma.sync" in ptx,
            "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "tma": "cp.async.bulk.tensor" in ptx, "shared_bytes": int(k.metadata.shared)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    args = p.parse_args(argv)
    if args.json.exists():
        p.error(f"{args.json} exists; choose another path")
    rows = []
    print(f"Triton {triton.__version__}, sm{args.arch}")
    print(f"{'kernel':16s} {'BMxBNxBK':>12s} {'st':>3s} {'wg':>3s}  {'wgmma':18s} {'mma.sync':>8s} "
          f"{'cp.async':>8s} {'TMA':>4s} {'smem KB':>8s}")
    for name, (fn, consts) in KERNELS.items():
        for cfg in T._configs():
            r = lower(fn, consts, cfg, args.arch)
            kw = cfg.kwargs
            tile = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
            rows.append({"kernel": name, "tile": tile, "num_stages": cfg.num_stages, "num_warps": cfg.num_warps} | r)
            print(f"{name:16s} {tile:>12s} {cfg.num_stages:3d} {cfg.num_warps:3d}  "
                  f"{','.join(r['wgmma_shapes']) or '-':18s} {str(r['mma_sync']):>8s} {r['cp_async']:8d} "
                  f"{str(r['tma']):>4s} {r['shared_bytes'] / 1024:8.1f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "rows": rows}, indent=2))
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

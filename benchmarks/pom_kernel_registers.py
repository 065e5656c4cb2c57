"""Compile the fused PoM kernels (and the convolution's) for a GPU target without a GPU; print
registers and spills.

    python benchmarks/pom_kernel_registers.py                  # sm_90, bf16, the launch shapes
    python benchmarks/pom_kernel_registers.py --shapes 64x64x4,64x32x8 --heads 1,4

Triton compiles to PTX and its bundled ptxas assembles it (``-v``), so this runs on any machine
with Triton: a check that every kernel compiles for the target and that the register use of a
launch shape (CHUNK x block_c x num_warps) leaves room for a few programs per SM without spills.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from muongpt.kernels import causal_conv as C
from muongpt.kernels import pom as K

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
INTS = ("T", "n_chunks", "E", "W", "S", "D", "n_tiles")


def compile_one(fn, pointers: dict, constants: dict, warps: int, arch: int) -> str:
    signature = {n: pointers.get(n, "i32" if n in INTS else "constexpr") for n in fn.arg_names}
    # pointers and sizes aligned to 16, as at d = 768 (Triton specializes them so at launch)
    ints = [n for n in INTS if n in fn.arg_names]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in [*pointers, *ints]}
    src = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    out = subprocess.run(
        [PTXAS, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True
    )
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} B spilled"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--degree", type=int, default=2)
    p.add_argument("--heads", default="1,4")
    p.add_argument("--shapes", default="", help="CHUNK x block_c x warps; default FWD and BWD")
    args = p.parse_args()
    dt = args.dtype
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        passes = [(shape,) * 4 for shape in shapes]
    else:  # forward, backward, single-pass forward, single-pass backward
        passes = [tuple((K.CHUNK, *cfg) for cfg in (K.FWD, K.BWD, K.ROW_FWD, K.ROW_BWD))]
    fwd_ptrs = {"pg": f"*{dt}", "prefix": "*fp32", "z": f"*{dt}"}
    bwd_ptrs = {"pg": f"*{dt}", "prefix": "*fp32", "suffix": "*fp32", "dz": f"*{dt}"}
    bwd_ptrs["dpg"] = f"*{dt}"
    bwd_rows_ptrs = {k: v for k, v in bwd_ptrs.items() if k != "suffix"}

    def rows_c(chunk: int) -> dict:
        return {"N_CHUNKS": 1024 // chunk, "DEGREE_P2": 1 << (args.degree - 1).bit_length()}

    for (fc, fb, fw), (bc, bb, bw), (rfc, rfb, rfw), (rbc, rbb, rbw) in passes:
        for heads in (int(h) for h in args.heads.split(",")):
            c = {"DEGREE": args.degree, "HEADS": heads}
            rows = [
                ("h sums", K._h_sums_kernel, {"pg": f"*{dt}", "sums": "*fp32"},
                 {"DEGREE": args.degree, "CHUNK": fc, "BLOCK_C": fb}, fw),
                ("forward", K._mix_fwd_kernel, fwd_ptrs, {**c, "CHUNK": fc, "BLOCK_C": fb}, fw),
                ("u sums", K._u_sums_kernel, {"pg": f"*{dt}", "dz": f"*{dt}", "sums": "*fp32"},
                 {**c, "CHUNK": bc, "BLOCK_C": bb}, bw),
                ("backward", K._mix_bwd_kernel, bwd_ptrs, {**c, "CHUNK": bc, "BLOCK_C": bb}, bw),
                # the single-pass kernels (ROW_SCAN_PROGRAMS_PER_SM), at T = 1,024
                ("fwd rows", K._mix_fwd_rows_kernel, fwd_ptrs,
                 {**c, **rows_c(rfc), "CHUNK": rfc, "BLOCK_C": rfb}, rfw),
                ("bwd rows", K._mix_bwd_rows_kernel, bwd_rows_ptrs,
                 {**c, **rows_c(rbc), "CHUNK": rbc, "BLOCK_C": rbb}, rbw),
            ]  # fmt: skip
            for name, fn, ptrs, consts, warps in rows:
                shape = f"{consts['CHUNK']}x{consts['BLOCK_C']}x{warps}"
                info = compile_one(fn, ptrs, consts, warps, args.arch)
                print(f"{name:<9} heads {heads}  {shape:<9} sm_{args.arch}: {info}")
    # the convolution's kernels (kernels/causal_conv.py): x fp32 in, u in the model's dtype
    conv = {"K": 4, "BLOCK_T": C.BLOCK_T, "BLOCK_D": C.BLOCK_D}
    shape = f"{C.BLOCK_T}x{C.BLOCK_D}x{C.NUM_WARPS}"
    rows = [
        ("conv fwd", C._conv_fwd_kernel, {"x": "*fp32", "w": "*fp32", "u": f"*{dt}"}),
        ("conv bwd", C._conv_bwd_kernel,
         {"x": "*fp32", "w": "*fp32", "du": f"*{dt}", "dx": "*fp32", "dw_parts": "*fp32"}),
    ]  # fmt: skip
    for name, fn, ptrs in rows:
        info = compile_one(fn, ptrs, conv, C.NUM_WARPS, args.arch)
        print(f"{name:<9} k 4      {shape:<9} sm_{args.arch}: {info}")


if __name__ == "__main__":
    main()

"""A step time projected from a compiled program, kernel by kernel: a figure that can be wrong.

Every kernel the program launches (a fusion, a matmul, a library call, a copy), times the
loops around it, costs max(FLOPs / peak, bytes / memory bandwidth) at best and their sum at
worst; collectives cost their bytes over the interconnect, from fully hidden behind compute
to not at all: inside a slice over its links (ICI), between slices over the data-centre network
(DCN, recipes.experiments.hlo_collectives.level). FLOPs are those of the kernel's matmuls (dots
inside a fusion, cuBLAS GEMMs, cuDNN attention from its own shapes); elementwise work is left to
the memory side. Bytes are what a kernel reads and writes: its operands and results, where a
fusion that only slices a large operand (a layer of stacked weights) or updates one in place (a
layer's saved activations) moves the slice, not the whole buffer.

Checked against a measurement: for GPT-2 small's step on one H200 (AdamW, micro-batch 64), as
compiled at the commit the device check measured, the range is 156-179 ms; the H200 took 205.8
ms (recipes/experiments/results/step_projection_2026-12-07).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np

from recipes.experiments.hlo_collectives import (LEVELS, _DTYPE_BYTES, _WHILE, _split, dcn_transfer, fused_kind, level,
                                                 trip_count)

_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
                "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-start",
                "copy-done", "async-done", "async-update", "send", "send-done", "recv", "recv-done", "domain"}
COLLECTIVES = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-reduce": 2.0, "all-to-all": 1.0,
               "collective-permute": 1.0}  # bytes moved over the links, per result byte (ring algorithms)
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_DIMS = re.compile(r"(lhs_contracting_dims)=\{([\d,]*)\}")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def _parse(line: str):
    """(name, shape text, opcode, operand names, attributes text) of an instruction line, or None."""
    found = _NAME.match(line)
    if not found:
        return None
    rest = line[found.end():]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren <= 0:
        return None
    opcode, close = rest[:paren], _balanced(rest, paren)
    arguments = rest[paren + 1:close - 1]
    if opcode == "parameter":  # its number, where a fusion's operands are matched to it
        return found.group(1), shape, opcode, [], f"number={arguments.strip()}"
    return found.group(1), shape, opcode, re.findall(r"%([\w.\-]+)", arguments), rest[close:]


def _arrays(shape: str) -> list[tuple[str, list[int]]]:
    return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in _ARRAY.findall(shape) if t in _DTYPE_BYTES]


def _bytes(shape: str) -> int:
    return sum(_DTYPE_BYTES[t] * int(np.prod(dims)) for t, dims in _arrays(shape) if dims)


# TPU compiler calls that allocate or reinterpret buffers without moving their bytes.
_NO_TRAFFIC_CALLS = {"AllocateBuffer", "ConcatBitcast"}


def _first_array_bytes(shape: str, last: bool = False) -> int:
    arrays = [a for a in _arrays(shape) if a[1]]
    if not arrays:
        return 0
    dtype, dims = arrays[-1] if last else arrays[0]
    return _DTYPE_BYTES[dtype] * int(np.prod(dims))


def _dot_flops(out_shape: str, lhs_shape: str, attributes: str) -> float:
    out, lhs = _arrays(out_shape), _arrays(lhs_shape)
    dims = _DIMS.search(attributes)
    if not out or not lhs or not dims:
        return 0.0
    contracted = int(np.prod([lhs[0][1][int(d)] for d in dims.group(2).split(",") if d]))
    return 2.0 * int(np.prod(out[0][1])) * contracted


def _window(attributes: str, key: str, rank: int, default: int) -> list:
    window = attributes.split("window={", 1)[-1].split("}", 1)[0] if "window={" in attributes else ""
    found = re.search(rf"\b{key}=([\d_x]+)", window)
    if not found:
        return [(default, default) if key == "pad" else default] * rank
    parts = found.group(1).split("x")
    return [tuple(int(v) for v in p.split("_")) for p in parts] if key == "pad" else [int(p) for p in parts]


def _valid_taps(n_in: int, n_out: int, size: int, stride: int, pad_low: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dim whose tap lands on a real input element."""
    span = (n_in - 1) * lhs_dilate + 1
    pos = np.arange(n_out)[:, None] * stride + np.arange(size)[None, :] * rhs_dilate - pad_low
    return int(np.sum((pos >= 0) & (pos < span) & (pos % lhs_dilate == 0)))


def _convolution_flops(out_shape: str, lhs_shape: str, rhs_shape: str, attributes: str) -> float:
    """A matmul written as a convolution (as the TPU compiler writes them): 2 x batch x output
    features x input features x the window taps that land on real inputs (padding and dilation
    holes, where the compiler folds batch dims into the window, do no work)."""
    out, lhs, rhs = _arrays(out_shape), _arrays(lhs_shape), _arrays(rhs_shape)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attributes)
    if not out or not lhs or not rhs or not labels:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    out_dims, lhs_dims, rhs_dims = out[0][1], lhs[0][1], rhs[0][1]
    spatial = sorted(c for c in out_l if c.isdigit())
    rank = len(spatial)
    size, stride = _window(attributes, "size", rank, 1), _window(attributes, "stride", rank, 1)
    pad = _window(attributes, "pad", rank, 0)
    lhs_dilate, rhs_dilate = _window(attributes, "lhs_dilate", rank, 1), _window(attributes, "rhs_dilate", rank, 1)
    taps = 1
    for d, label in enumerate(spatial):
        taps *= _valid_taps(lhs_dims[lhs_l.index(label)], out_dims[out_l.index(label)], size[d], stride[d],
                            pad[d][0], lhs_dilate[d], rhs_dilate[d])
    return 2.0 * out_dims[out_l.index("b")] * out_dims[out_l.index("f")] * rhs_dims[rhs_l.index("i")] * taps


def _custom_call_flops(target: str, shape: str, operand_shapes: list[str], attributes: str) -> float:
    config = attributes.split("backend_config=", 1)[-1]
    if "cublas" in target:
        found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', config)
        if found and operand_shapes:
            out, lhs = _arrays(shape), _arrays(operand_shapes[0])
            contracted = int(np.prod([lhs[0][1][int(d.strip('" '))] for d in found.group(1).split(",") if d.strip()]))
            return 2.0 * int(np.prod(out[0][1])) * contracted
    if "fmha" in target:  # cuDNN attention: scores B x H x Lq x Lk, head size from the output
        scores = re.search(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":\s*\[([^\]]*)\]', config)
        out = _arrays(shape)
        if scores and out:
            bhll = int(np.prod([int(d.strip('" ')) for d in scores.group(1).split(",") if d.strip()]))
            matmuls = 5 if "Backward" in target else 2  # forward: QK^T, PV; backward: recompute, dV, dP, dQ, dK
            causal = 0.5 if '"CAUSAL"' in config else 1.0
            return 2.0 * matmuls * bhll * out[0][1][-1] * causal
    return 0.0


class Program:
    """The instructions of an HLO module's text, by computation."""

    def __init__(self, hlo_text: str):
        raw, self.entry = _split(hlo_text)
        self.computations = {name: [p for p in map(_parse, lines) if p] for name, lines in raw.items()}
        self.shapes = {name: {p[0]: p[1] for p in parsed} for name, parsed in self.computations.items()}
        self.raw = raw

    def fused_flops(self, computation: str, depth: int = 0) -> float:
        flops = 0.0
        for name, shape, opcode, operands, attributes in self.computations.get(computation, []):
            if opcode == "dot" and operands:
                flops += _dot_flops(shape, self.shapes[computation].get(operands[0], ""), attributes)
            elif opcode == "convolution" and len(operands) > 1:
                flops += _convolution_flops(shape, *(self.shapes[computation].get(o, "") for o in operands[:2]),
                                            attributes)
            elif opcode == "fusion" and depth < 8:
                flops += sum(self.fused_flops(c, depth + 1) for c in _CALLS.findall(attributes))
        return flops

    def _uses(self, computation: str) -> tuple[dict, dict]:
        params, uses = {}, defaultdict(list)
        for name, shape, opcode, operands, attributes in self.computations.get(computation, []):
            if opcode == "parameter":
                params[int(attributes.removeprefix("number="))] = name
            for position, operand in enumerate(operands):
                uses[operand].append((name, shape, opcode, position, operands, attributes))
        return params, uses

    def _value_bytes(self, computation: str, value: str, full: int, uses: dict, depth: int) -> tuple[int, int]:
        """(bytes read, bytes updated in place) of a value inside a fused computation, following it
        through bitcasts and into nested fusions; a value only sliced reads its slices."""
        read = in_place = 0
        for name, shape, opcode, position, operands, attributes in uses.get(value, []):
            if opcode in ("dynamic-slice", "slice", "gather") and position == 0:  # reads what it returns
                read += _bytes(shape)
            elif opcode == "dynamic-update-slice" and position == 0 and len(operands) > 1:
                in_place += _bytes(self.shapes[computation].get(operands[1], ""))
            elif opcode == "bitcast" and depth < 16:
                r, u = self._value_bytes(computation, name, full, uses, depth + 1)
                read, in_place = read + r, in_place + u
            elif opcode == "fusion" and depth < 16 and _CALLS.search(attributes):
                callee = _CALLS.search(attributes).group(1)
                params, inner = self._uses(callee)
                r, u = self._value_bytes(callee, params.get(position, ""), full, inner, depth + 1)
                read, in_place = read + r, in_place + u
            else:
                return full, 0
        return min(read, full), min(in_place, full)

    def fusion_bytes(self, computation: str, operand_shapes: list[str], shape: str) -> int:
        """Operands read and results written by a fusion; an operand only sliced counts its slices,
        one updated in place (dynamic-update-slice) only the update written."""
        params, uses = self._uses(computation)
        total, in_place = 0, 0
        for i, operand_shape in enumerate(operand_shapes):
            full = _bytes(operand_shape)
            read, updated = self._value_bytes(computation, params.get(i, ""), full, uses, 0)
            if updated:  # the buffer is the result too: only the update is written, nothing read
                in_place += full - updated
            else:
                total += read
        return total + max(_bytes(shape) - in_place, 0)

    def kernels(self, granule_of: list[int] | None = None) -> list[dict]:
        """Every kernel launch of one execution: name, kind, launches, FLOPs and bytes per launch, and
        for collectives the bytes over the links and their level (granule_of: see hlo_collectives.level)."""
        found = []

        def visit(computation: str, times: int, depth: int = 0) -> None:
            if depth > 32:
                return
            shapes = self.shapes.get(computation, {})
            for name, shape, opcode, operands, attributes in self.computations.get(computation, []):
                operand_shapes = [shapes.get(o, "") for o in operands]
                loop = _WHILE.search(f" {opcode}({', '.join(operands)}){attributes}")
                if opcode == "while" and loop:
                    visit(loop.group(2), times * (trip_count(self.raw, *loop.groups(), attributes) or 1), depth + 1)
                    continue
                if opcode in ("call", "async-start", "conditional"):
                    for callee in _CALLS.findall(attributes) + re.findall(r"%([\w.\-]+)", attributes.split(
                            "branch_computations=", 1)[-1] if "branch_computations=" in attributes else ""):
                        visit(callee, times, depth + 1)
                    continue
                base = opcode.removesuffix("-start").removesuffix("-done")
                transfer = dcn_transfer(f"= {shape} {opcode}({attributes}") if opcode == "recv" else None
                if transfer:  # a collective between TPU slices, received: its result
                    found.append({"name": name, "kind": transfer[1], "launches": times, "flops": 0.0, "bytes": 0,
                                  "link_bytes": _bytes(shape) * COLLECTIVES[transfer[1]], "level": "dcn"})
                    continue
                if opcode in _NOT_KERNELS or opcode.endswith("-done"):
                    continue
                if base in COLLECTIVES:
                    arrays = [a for a in _arrays(shape) if a[1]]
                    moved = _DTYPE_BYTES[arrays[-1][0]] * int(np.prod(arrays[-1][1])) if arrays else 0
                    found.append({"name": name, "kind": base, "launches": times, "flops": 0.0, "bytes": 0,
                                  "link_bytes": moved * COLLECTIVES[base], "level": level(attributes, granule_of)})
                    continue
                # A collective fused into a kernel (async, a reduce-scatter, or beside a matmul): its bytes go
                # on the links, and the kernel's own compute and memory count as any fusion's.
                for callee in _CALLS.findall(attributes) if opcode == "fusion" else ():
                    for _, inner_shape, inner, _, inner_attributes in self.computations.get(callee, []):
                        if inner.removesuffix("-start") in COLLECTIVES:
                            inner_kind = fused_kind(callee, inner.removesuffix("-start"))
                            moved = _first_array_bytes(inner_shape, last=True)
                            found.append({"name": name, "kind": inner_kind, "launches": times, "flops": 0.0,
                                          "bytes": 0, "link_bytes": moved * COLLECTIVES[inner_kind],
                                          "level": level(inner_attributes, granule_of)})
                flops, moved = 0.0, _bytes(shape) + sum(_bytes(s) for s in operand_shapes)
                kind = opcode
                if opcode == "fusion":
                    callees = _CALLS.findall(attributes)
                    flops = sum(self.fused_flops(c) for c in callees)
                    moved = self.fusion_bytes(callees[0], operand_shapes, shape) if callees else moved
                elif opcode == "dot" and operand_shapes:
                    flops = _dot_flops(shape, operand_shapes[0], attributes)
                elif opcode == "convolution" and len(operand_shapes) > 1:
                    flops = _convolution_flops(shape, operand_shapes[0], operand_shapes[1], attributes)
                elif opcode == "custom-call":
                    target = _TARGET.search(attributes)
                    kind = target.group(1) if target else opcode
                    flops = _custom_call_flops(kind, shape, operand_shapes, attributes)
                    if kind in _NO_TRAFFIC_CALLS:
                        moved = 0
                    elif "cublas" in kind or "fmha" in kind:  # results hold a workspace too: the first array
                        moved = sum(_bytes(s) for s in operand_shapes) + _first_array_bytes(shape)
                elif opcode.endswith("-start"):  # an async copy or slice: its result, read and written
                    moved = 2 * _first_array_bytes(shape, last=True)
                elif opcode == "dynamic-update-slice" and len(operand_shapes) > 1:
                    moved = 2 * _bytes(operand_shapes[1])
                elif opcode in ("dynamic-slice", "gather"):
                    moved = 2 * _bytes(shape) + sum(_bytes(s) for s in operand_shapes[1:])
                found.append({"name": name, "kind": kind, "launches": times, "flops": flops, "bytes": moved,
                              "link_bytes": 0.0})

        visit(self.entry or next(iter(self.computations), ""), 1)
        return found


def project(hlo_text: str, *, peak_flops: float, memory_bytes_per_s: float, link_bytes_per_s: float | None,
            dcn_bytes_per_s: float | None = None, granule_of: list[int] | None = None, top: int = 12) -> dict:
    """The step-time range of one device's program and what it is made of. Collectives inside a
    slice go at link_bytes_per_s, those between slices at dcn_bytes_per_s (None: the link's)."""
    kernels = Program(hlo_text).kernels(granule_of)
    rates = {"ici": link_bytes_per_s, "dcn": dcn_bytes_per_s or link_bytes_per_s}
    for k in kernels:
        compute, memory = k["flops"] / peak_flops, k["bytes"] / memory_bytes_per_s
        rate = rates[k.get("level", "ici")]
        link = k["link_bytes"] / rate if rate else 0.0
        k["best_s"], k["worst_s"], k["link_s"] = max(compute, memory), compute + memory, link
    total = {key: sum(k[key] * k["launches"] for k in kernels) for key in ("flops", "bytes", "link_bytes",
                                                                            "best_s", "worst_s", "link_s")}
    by_kind = defaultdict(lambda: {"launches": 0, "flops": 0.0, "bytes": 0, "best_s": 0.0})
    for k in kernels:
        entry = by_kind[k["kind"] if k["kind"] in COLLECTIVES or "$" in k["kind"] else
                        ("matmul" if k["flops"] else k["kind"])]
        entry["launches"] += k["launches"]
        for key in ("flops", "bytes", "best_s"):
            entry[key] += k[key] * k["launches"]
    heaviest = sorted(kernels, key=lambda k: -(k["best_s"] + k["link_s"]) * k["launches"])[:top]
    return {
        "flops": total["flops"], "bytes": total["bytes"], "link_bytes": total["link_bytes"],
        "kernels": sum(k["launches"] for k in kernels),
        # Fastest: each kernel at its roofline, collectives hidden behind compute. Slowest: compute and
        # memory of each kernel one after the other, collectives after everything.
        "step_s_range": [total["best_s"], total["worst_s"] + total["link_s"]],
        "collectives_s": total["link_s"],
        "link_bytes_by_level": {lv: sum(k["link_bytes"] * k["launches"] for k in kernels if k.get("level") == lv)
                                for lv in LEVELS},
        "collectives_s_by_level": {lv: sum(k["link_s"] * k["launches"] for k in kernels if k.get("level") == lv)
                                   for lv in LEVELS},
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["best_s"])),
        "heaviest": [{key: k[key] for key in ("name", "kind", "launches", "flops", "bytes", "best_s", "link_s")}
                     for k in heaviest],
    }


def main(argv=None) -> int:
    """python -m recipes.experiments.hlo_roofline --hlo FILE --topology h200-1: a saved program's projection."""
    import argparse

    from recipes.experiments.gpu_slices import parse_topology

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--hlo", required=True, help="an optimized HLO module as text (compiled.as_text())")
    parser.add_argument("--topology", required=True, help="whose chip figures to use: v5e-8, h200-1, ...")
    parser.add_argument("--tokens", type=int, help="tokens per step, for tokens/s")
    args = parser.parse_args(argv)
    chip = parse_topology(args.topology).chip
    with open(args.hlo) as file:
        report = project(file.read(), peak_flops=chip.peak_bf16_flops, memory_bytes_per_s=chip.hbm_bytes_per_s,
                         link_bytes_per_s=chip.link_bytes_per_s or None,
                         dcn_bytes_per_s=chip.dcn_bytes_per_s or None)
    if args.tokens:
        report["tokens_per_s_range"] = [args.tokens / s for s in reversed(report["step_s_range"])]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

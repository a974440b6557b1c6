"""Collectives of a compiled program, read from its HLO text: counts and bytes per step.

A collective inside a loop body runs once per iteration; the iteration count of a loop
(the layer scan, the micro-batch scan) is read from its condition, which compares the
counter with a constant. A loop whose count cannot be read counts once, and is named in
``uncounted_loops``.

Each collective is put on a level: "ici" when it stays inside one slice (or host), "dcn" when
it crosses between them over the data-centre network. A TPU program compiled for several
slices is one slice's program: the compiler keeps its collectives inside the slice and sends
what crosses slices through the multi-slice runtime, as host transfers marked with
``_xla_megascale_transfer_type`` (ALL_REDUCE, ALL_GATHER, ...): those are the dcn ones. A
program over all devices instead names them in replica groups (partition ids: positions in the
program's device assignment, for an SPMD program the mesh's ``devices.flat``), and a group
whose devices sit in different granules is dcn.
"""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CALLEE = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\(.*condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_CONSTANT = re.compile(r"[su](?:32|64)\[\](?:\{[^}]*\})?\s+constant\((\d+)\)")
LEVELS = ("ici", "dcn")
# A transfer between slices: the receiving end holds the collective's result.
_DCN_TRANSFER = re.compile(r"=\s*(\(.*?\)|\S+)\s+recv\(.*_xla_megascale_transfer_type=\"([A-Z_]+)\"")
_DCN_KINDS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
              "ALL_TO_ALL": "all-to-all", "COLLECTIVE_PERMUTE": "collective-permute",
              "ONE_TO_ONE": "collective-permute"}
_GROUPS = re.compile(r"(?:replica_groups|source_target_pairs)=(\{(?:[^{}]|\{[^{}]*\})*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")
_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def replica_groups(attributes: str) -> list[list[int]] | None:
    """The device groups of a collective's line: explicit ``{{0,1},{2,3}}``, iota ``[2,4]<=[8]`` or
    ``[4,2]<=[2,4]T(1,0)`` (iota over the second shape, transposed, cut into the first shape's rows),
    or source-target pairs. [] when the groups are empty (every device one group); None when absent."""
    found = _GROUPS.search(attributes)
    if not found:
        return None
    text = found.group(1)
    iota = _IOTA.fullmatch(text)
    if iota:
        shape, dims, perm = ([int(v) for v in g.split(",")] if g else None for g in iota.groups())
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        ids = ids.transpose(perm) if perm else ids
        return ids.reshape(shape[0], -1).tolist()
    return [[int(v) for v in g.split(",") if v.strip()] for g in re.findall(r"\{([\d,\s]*)\}", text[1:-1])]


def level(line: str, granule_of: list[int] | None = None) -> str:
    """"dcn" when a collective's line crosses granules (slices or hosts), else "ici". granule_of[i]
    is the granule of partition i (None: the program is one granule's own, as TPU multi-slice
    programs are, and only its host transfers between slices cross)."""
    if "_xla_megascale_transfer_type" in line:
        return "dcn"
    if granule_of is None:
        return "ici"
    groups = replica_groups(line)
    if groups == []:
        groups = [list(range(len(granule_of)))]
    for group in groups or ():
        if len({granule_of[i] for i in group if i < len(granule_of)}) > 1:
            return "dcn"
    return "ici"


def dcn_transfer(line: str) -> tuple[str, str] | None:
    """(result shape, kind) of a transfer between TPU slices (its receiving end), else None."""
    found = _DCN_TRANSFER.search(line)
    if not found or found.group(2) not in _DCN_KINDS:
        return None
    return found.group(1), _DCN_KINDS[found.group(2)]


def fused_kind(computation: str, kind: str) -> str:
    """The TPU compiler writes a reduce-scatter as an all-reduce fused with the slice each device
    keeps (an all-reduce-scatter fusion): counted as a reduce-scatter of the all-reduce's bytes,
    its input, about what a ring moves per device."""
    return "reduce-scatter" if kind == "all-reduce" and computation.startswith("all-reduce-scatter") else kind


def partitions(hlo_text: str) -> int | None:
    """How many devices the program runs on (its partitions times replicas), from the module header."""
    header = hlo_text[:hlo_text.find("\n") if "\n" in hlo_text else len(hlo_text)]
    found = [re.search(rf"\b{key}=(\d+)", header) for key in ("num_partitions", "replica_count")]
    if not found[0] and not found[1]:
        return None
    return int(np.prod([int(f.group(1)) for f in found if f]))


def _array_bytes(shape: str) -> list[int]:
    """Bytes of each array in a shape, scalars left out (an async start's tuple ends with u32[] contexts)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES and dims:
            out.append(_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d])))
    return out


_COUNTER = re.compile(r"get-tuple-element\(.*index=(\d+)")
_STEP = re.compile(r"=\s*[su](?:32|64)\[\]\S*\s+add\((%?[\w.\-]+),\s*(%?[\w.\-]+)\)")


_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def trip_count(computations: dict[str, list[str]], condition: str, body: str, while_line: str = "") -> int | None:
    """Iterations of a loop: as the compiler recorded them on the while (GPU), else counting from 0 to
    the constant its condition compares with, in steps of the constant its body adds to the counter
    (the TPU compiler's windowed matmuls step by 2)."""
    known = _KNOWN_TRIPS.search(while_line)
    if known:
        return int(known.group(1))
    lines = computations.get(condition, [])
    bounds = [int(c) for c in _CONSTANT.findall("\n".join(lines))]
    if not bounds:
        return None
    counters = {int(m.group(1)) for m in map(_COUNTER.search, lines) if m}
    values, root = {}, ""
    for line in computations.get(body, []):
        name = line.split("=", 1)[0].strip().removeprefix("ROOT").strip().lstrip("%")
        values[name] = line
        if line.lstrip().startswith("ROOT") and " tuple(" in line:
            root = line
    step = 1
    next_values = re.findall(r"%([\w.\-]+)", root.split(" tuple(", 1)[-1]) if root else []
    for index in counters:
        add = _STEP.search(values.get(next_values[index], "")) if index < len(next_values) else None
        for operand in add.groups() if add else ():
            constant = _CONSTANT.search(values.get(operand.lstrip("%"), ""))
            if constant:
                step = max(int(constant.group(1)), 1)
    return -(-max(bounds) // step)


def _split(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line) if not line[:1].isspace() else None
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
        elif current is not None:
            computations[current].append(line)
    return computations, entry


def collectives(hlo_text: str, granule_of: list[int] | None = None) -> dict:
    """{kind: {count, bytes}} per execution of the program, the same bytes by level ({kind: {ici,
    dcn}} and totals), and the loops whose trip count was unknown. granule_of: see ``level``."""
    computations, entry = _split(hlo_text)
    edges = defaultdict(list)  # caller -> [(callee, times)]
    uncounted = []
    for name, lines in computations.items():
        for line in lines:
            loop = _WHILE.search(line)
            if loop:
                condition, body = loop.groups()
                trips = trip_count(computations, condition, body, line)
                if trips is None:
                    uncounted.append(body)
                edges[name] += [(body, trips or 1), (condition, 1)]
                continue
            edges[name] += [(callee, 1) for callee in _CALLEE.findall(line)]
            for group in _BRANCHES.findall(line):
                edges[name] += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
    times = defaultdict(int)

    def visit(name: str, factor: int, depth: int = 0) -> None:
        if depth > 64:
            return
        times[name] += factor
        for callee, n in edges.get(name, ()):
            visit(callee, factor * n, depth + 1)

    visit(entry or next(iter(computations), ""), 1)
    totals = {kind: {"count": 0, "bytes": 0} for kind in KINDS}
    by_level = {kind: dict.fromkeys(LEVELS, 0) for kind in KINDS}
    for name, lines in computations.items():
        for line in lines:
            if not times.get(name):
                continue
            found, transfer = _INSTRUCTION.search(line), None
            if found:
                shape, kind, is_start = found.groups()
                kind = fused_kind(name, kind)
                sizes = _array_bytes(shape)
                # An async start's result holds its operand and its result: the result is the last array.
                moved = sizes[-1] if is_start and len(sizes) > 1 else sum(sizes)
            elif "_xla_megascale_transfer_type" in line and (transfer := dcn_transfer(line)):
                shape, kind = transfer
                moved = sum(_array_bytes(shape))
            else:
                continue
            totals[kind]["count"] += times[name]
            totals[kind]["bytes"] += times[name] * moved
            by_level[kind][level(line, granule_of)] += times[name] * moved
    return {"per_step": totals, "by_level": by_level,
            "level_totals": {lv: sum(v[lv] for v in by_level.values()) for lv in LEVELS},
            "uncounted_loops": uncounted}


_CUSTOM_CALL = re.compile(r"custom-call\(.*custom_call_target=\"([^\"]+)\"")


def custom_calls(hlo_text: str) -> dict[str, int]:
    """{call target: instructions} of the program's custom calls (cuDNN attention, cuBLAS GEMMs, ...)."""
    found: dict[str, int] = defaultdict(int)
    for target in _CUSTOM_CALL.findall(hlo_text):
        found[target] += 1
    return dict(sorted(found.items()))

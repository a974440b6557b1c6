"""Compile a checkout's GPT-2 small step (AdamW, bf16, micro-batch 64 x 1024) for one H200, with no GPU.

    cd CHECKOUT && PYTHONPATH=. python compile_step_for_h200.py TARGET.txtpb OUT.hlo [--section.key=value ...]

Uses only what every commit since the device check has (load_config, build_program), so the
commit the H200 measured and today's can be compiled alike; project the saved program with
    python -m recipes.experiments.hlo_roofline --hlo OUT.hlo --topology h200-1 --tokens 65536
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jax.experimental import topologies  # noqa: E402

from recipes.train import config as config_lib  # noqa: E402
from recipes.train.build import build_program  # noqa: E402

target, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(target) as file:
    devices = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=file.read()).devices
config = config_lib.load_config("gpt2_small_adamw.yaml", ["--data.global_batch=64", "--data.micro_batch=64",
                                                          "--mesh.devices=1", *overrides])
compiled = build_program(config, devices=devices[:1], shapes_only=True, diagnostics=False).compile()
memory = compiled.memory_analysis()
peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes)
print(f"peak {peak / 2**30:.1f} GiB")
with open(out, "w") as file:
    file.write(compiled.as_text())

"""`viper plan`'s results: per-program bytes, FLOPs and time, the whole GRPO step, and the printed table."""

from __future__ import annotations

import dataclasses
from typing import Any

from viper_jax.plan.chips import GiB, ChipSpec
from viper_jax.plan.workload import Shapes


@dataclasses.dataclass
class ProgramReport:
    name: str
    per_step: float = 1.0     # how many times one GRPO step runs it
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    host_temp: int = 0        # offloaded activations (pinned host memory)
    resident: int = 0         # live on the chip but not an argument (e.g. optimizer state)
    xla_flops: float = 0.0    # cost_analysis, per chip, scanned bodies counted once
    model_flops: float = 0.0  # analytic, whole program, all chips
    hw_flops: float = 0.0     # analytic incl. remat recompute and batch padding, all chips
    hbm_traffic: float = 0.0  # analytic lower bound, bytes per chip (memory-bound programs only)
    seconds: float = 0.0      # roofline lower bound
    compile_s: float = 0.0
    error: str = ""

    @property
    def total(self) -> int:
        """Peak bytes on one chip while the program runs: its buffers plus what stays resident."""
        return self.argument + self.output - self.alias + self.temp + self.code + self.resident


@dataclasses.dataclass
class PlanReport:
    topology: str
    chip: ChipSpec
    num_devices: int
    chips: int
    mesh: dict[str, int]
    settings: dict[str, Any]
    shapes: Shapes
    programs: list[ProgramReport]
    notes: list[str]

    @property
    def hbm_per_device(self) -> int:
        return self.chip.hbm_bytes * self.chips // self.num_devices

    @property
    def peak_per_device(self) -> float:
        return self.chip.peak_bf16_flops * self.chips / self.num_devices

    @property
    def fits(self) -> bool:
        return all(not p.error and p.total <= self.hbm_per_device for p in self.programs)

    @property
    def step_seconds(self) -> float:
        return sum(p.seconds * p.per_step for p in self.programs)

    @property
    def step_model_flops(self) -> float:
        return sum(p.model_flops * p.per_step for p in self.programs)

    @property
    def mfu(self) -> float:
        t = self.step_seconds
        return self.step_model_flops / (t * self.peak_per_device * self.num_devices) if t else 0.0

    def peak_bytes(self) -> int:
        return max((p.total for p in self.programs if not p.error), default=0)

    def problems(self) -> list[str]:
        out = []
        for p in self.programs:
            if p.error:
                out.append(f"{p.name}: {p.error}")
            elif p.total > self.hbm_per_device:
                out.append(f"{p.name} needs {_gib(p.total)} per chip, more than the {_gib(self.hbm_per_device)} "
                           f"of HBM of a {self.chip.name} chip")
        return out


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _fl(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.3g} FLOP"


def format_report(r: PlanReport) -> str:
    s = r.shapes
    lines = [f"viper plan: {r.topology} = {r.chips} x {r.chip.name} ({r.num_devices} devices), "
             f"HBM {_gib(r.hbm_per_device)}/device, peak {r.peak_per_device / 1e12:.0f} TFLOP/s bf16/device",
             f"  mesh {r.mesh}; " + ", ".join(f"{k}={v}" for k, v in r.settings.items()),
             f"  shapes: rollout {s.rollout_prompts} prompts x G={s.group_size}, micro-batch {s.micro_prompts} prompts "
             f"({s.micro_prompts * s.group_size} rows), prompt {s.prompt_len} + response {s.response_len} tokens, "
             + (f"{s.images_per_prompt} image(s) x {s.image_tokens} tokens per prompt" if s.images_per_prompt
                  else "text only")]
    head = (f"  {'program':<25}{'x/step':>7}{'args':>11}{'outputs':>11}{'alias':>11}{'temps':>11}{'resident':>11}"
            f"{'total':>11}{'/HBM':>6}  {'model FLOPs':>12}{'XLA FLOPs/chip':>16}{'est. time':>11}")
    lines += ["  per chip (GiB):", head]
    g = lambda x: f"{x / GiB:>11.2f}"
    for p in r.programs:
        if p.error:
            lines.append(f"  {p.name:<25}{p.per_step:>7g}  DOES NOT COMPILE: {p.error}")
            continue
        lines.append(f"  {p.name:<25}{p.per_step:>7g}{g(p.argument)}{g(p.output)}{g(p.alias)}{g(p.temp)}{g(p.resident)}"
                     f"{g(p.total)}{100 * p.total / r.hbm_per_device:>5.0f}%  {_fl(p.model_flops):>12}"
                     f"{_fl(p.xla_flops):>16}{p.seconds * 1e3:>9.1f}ms")
        if p.host_temp:
            lines.append(f"  {'':<25}  + {_gib(p.host_temp)} of offloaded activations in host memory")
    lines.append(f"  GRPO step: {_fl(r.step_model_flops)} model FLOPs, estimated >= {r.step_seconds:.1f} s "
                 f"(roofline, no communication), MFU <= {100 * r.mfu:.1f}%; peak {_gib(r.peak_bytes())} per device")
    lines += [f"  note: {n}" for n in r.notes]
    problems = r.problems()
    lines.append("  FITS" if not problems else "  DOES NOT FIT:\n" + "\n".join(f"    - {p}" for p in problems))
    return "\n".join(lines)

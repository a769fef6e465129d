"""One guided UNet step on the CPU: PyTorch eager, the `cpu` preset's UNet and OpenVINO, timed in
one process in interleaved rounds, with the memory each holds.

    python examples/cpu_unet_step.py                       # random:sd15, 256 and 512
    python examples/cpu_unet_step.py --sizes 256 --rounds 3
    python examples/cpu_unet_step.py --set unet_dtype=fp32   # the preset's fp32 path
    python examples/cpu_unet_step.py --model random:sdxl --preset sdxl-cpu --sizes 1024 --lean

Rows: eager fp32 (the reference: the preset's UNet with its passes undone), eager bf16 (only where
the CPU has native bf16), the preset's UNet (precision `auto` and the preset's passes, built by
the engine as `sdaccel generate --preset cpu` builds it, with any `--set` overrides), OpenVINO at
its default precision (only where the CPU has native bf16; elsewhere that is f32) and at f32
(bench's `--peer openvino` conversion). Each row's time is the median over rounds; the speed-up
is the median of per-round ratios to eager fp32; the error is the UNet output's relative L2
distance to eager fp32's; last, the preset's time over OpenVINO's (at the preset's precision: f32
for an fp32 preset) per round. The preset's `reuse_freed_memory` holds for the whole process, so
every row runs with it. Prints markdown; nothing else should use the CPU meanwhile.

Memory (anonymous memory, resident or swapped out; not mapped files): "model GiB" is what the
row keeps between calls (a torch row's parameters, and the preset's packed weight copies; an
OpenVINO row's growth over its conversion, compilation and first call); "step GiB" is the growth
during one untimed call, sampled every 5 ms from a heap trimmed before it (the timed rounds run
without either).

`--lean` (for a model whose rows do not fit in memory together, SDXL on 24 GiB): two phases, each
interleaving the preset with one peer, OpenVINO at the preset's precision and then eager fp32;
each peer is dropped before the next is built, and no eager bf16 or second OpenVINO row is made.
OpenVINO's speed-up over eager fp32 is then derived through the preset (the product of the two
phases' median ratios) and said to be. Where even that needs swap (SDXL's phase 2: 10 GiB of
fp32 weights beside the preset's bf16 and packed copies), what the timed calls never touch (the
preset's unpacked weights) is what goes there; each phase says how much was read back from swap
during its timed rounds, which should be nothing.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import resource
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sdaccel.bench.openvino_peer import convert_unet, openvino_config, unet_inputs  # noqa: E402
from sdaccel.engine.engine import Engine  # noqa: E402
from sdaccel.engine.loading.precision import cpu_bf16_support  # noqa: E402
from sdaccel.engine.sampling.cost import added_kwargs  # noqa: E402
from sdaccel.engine.speed.prepack import Packed, unpack_layers  # noqa: E402
from sdaccel.settings import resolve_settings  # noqa: E402

GIB = 2**30


def resident() -> int:
    """This process's anonymous bytes now, in memory or swapped out (weights, activations; not
    the pages of mapped files, which the system can drop and read again)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return sum(int(fields[name].split()[0]) for name in ("RssAnon", "VmSwap")) * 1024


def trim_heap() -> None:
    """Give freed memory back to the system (the preset keeps it otherwise), so that a call's
    resident growth is its own."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


class ResidentPeak:
    """The most resident memory above the start, sampled every 5 ms while the block runs."""

    def __enter__(self):
        self.start = self.peak = resident()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, resident())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers, and the packed copies of pre-packed layers."""
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [layer.packed for layer in module.modules()
                if isinstance(layer, Packed) and layer.packed is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def context_shape(engine) -> tuple[int, int]:
    """(tokens, width) of the text embeddings the UNet reads (both encoders' widths for SDXL)."""
    return engine.tokenizer.model_max_length, engine.unet.config.cross_attention_dim


def plain_copy(unet):
    """An fp32 copy of the preset's UNet with its passes undone: the eager reference. Each
    tensor is copied straight to fp32 (no copy at the preset's precision on the way: SDXL's is
    5 GB)."""
    memo = {id(t): (torch.nn.Parameter(t.detach().float(), requires_grad=False)
                    if isinstance(t, torch.nn.Parameter) else t.float())
            for t in [*unet.parameters(), *unet.buffers()] if t.is_floating_point()}
    fp32 = copy.deepcopy(unet, memo).to(memory_format=torch.contiguous_format)
    unpack_layers(fp32)
    if any(getattr(m, "fused_projections", False) for m in fp32.modules()):
        fp32.unfuse_qkv_projections()
        for module in fp32.modules():  # unfusing leaves the fused layers in place (SDXL: 2.4 GB)
            for name in ("to_qkv", "to_kv"):
                if hasattr(module, name):
                    delattr(module, name)
    return fp32


@dataclass
class Row:
    """One way of running the step: `call(sample, t, context, *added) -> noise`, the module it
    runs (for its bytes), and, for OpenVINO, the resident memory it took to set up."""

    call: object
    setup_s: float = 0.0
    module: torch.nn.Module | None = None
    held: int | None = None
    output: torch.Tensor | None = None
    first_s: float = 0.0
    times: list[float] = field(default_factory=list)
    step_peak: int = 0

    def model_bytes(self) -> int:
        return self.held if self.held is not None else module_bytes(self.module)


def eager_row(unet, dtype=torch.float32) -> Row:
    def call(x, t, c, *added):
        return unet(x.to(dtype), t, c.to(dtype), **added_kwargs(tuple(
            a.to(dtype) for a in added))).sample.float()
    return Row(call, module=unet)


def preset_row(cpu: Engine, built_s: float) -> Row:
    dtype = cpu.unet_dtype

    def call(x, t, c, *added):
        return cpu.unet_forward(x.to(dtype), t, c.to(dtype), **added_kwargs(tuple(
            a.to(dtype) for a in added))).sample.float()
    return Row(call, built_s, module=cpu.unet)


def openvino_row(make_fp32, cpu: Engine, precision: str, inputs: tuple,
                 scratch: str | None = None) -> Row:
    """OpenVINO's row: the fp32 UNet `make_fp32()` gives converted (traced at a small size and
    reshaped to this one when it compiles: a trace at SDXL's 1024x1024 in fp32 holds
    activations a 24 GiB machine does not have beside the weights), compiled and called once
    (counted in `held`); the converted graph is dropped after, so that only the compiled model
    holds memory. With `scratch` (a folder) the converted model is saved there as OpenVINO IR
    and read back before it compiles, as OpenVINO's users run it: the torch UNet is then freed
    before compiling, and the IR's weights are a mapped file, not process memory."""
    trim_heap()
    before, started = resident(), time.perf_counter()
    converted = convert_unet(make_fp32(), context_shape(cpu), openvino_config(precision), 32)
    if scratch is not None:
        import openvino as ov

        path = os.path.join(scratch, "unet.xml")
        ov.save_model(converted.model, path, compress_to_fp16=False)
        converted.model = converted.core.read_model(path)  # the torch UNet is freed here
    converted(*inputs)
    setup = time.perf_counter() - started
    converted.model = None  # one size per process: no reshape after this
    trim_heap()
    return Row(converted, setup, held=resident() - before)


def drop_all_but_the_unet(cpu: Engine) -> None:
    """Free the text encoders' and the VAE's weights (a step needs only the UNet)."""
    for module in (cpu.text_encoder, cpu.text_encoder_2, cpu.vae):
        if module is not None:
            module.to("meta")
    trim_heap()


def preset_name(cpu: Engine, preset: str) -> str:
    passes = ", ".join(cpu.passes) + ", compiled" * cpu.settings.compile.enabled
    return f"`{preset}` preset ({cpu.settings.unet_dtype}, {passes})"


def swapped_in() -> int:
    """Pages the system has read back from swap since it started."""
    with open("/proc/vmstat") as vmstat:
        return next(int(line.split()[1]) for line in vmstat if line.startswith("pswpin "))


def time_rows(rows: dict[str, Row], inputs: tuple, rounds: int) -> None:
    """First calls (compiling, packing), one untimed call each for its memory, then `rounds`
    interleaved rounds, into each Row. The timed calls run without the memory sampler and
    without trimming the heap, which would undo the preset's `reuse_freed_memory`. Says how
    much was read back from swap during the rounds: anything but nothing means a row waited for
    the disk and its time is not its own."""
    with torch.inference_mode():
        for row in rows.values():
            started = time.perf_counter()
            row.output = row.call(*inputs)
            row.first_s = time.perf_counter() - started
        for row in rows.values():
            trim_heap()
            with ResidentPeak() as peak:
                row.call(*inputs)
            row.step_peak = peak.growth
        swap_before = swapped_in()
        for _ in range(rounds):
            for row in rows.values():
                started = time.perf_counter()
                row.call(*inputs)
                row.times.append(time.perf_counter() - started)
    back = (swapped_in() - swap_before) * os.sysconf("SC_PAGE_SIZE")
    print(f"Read back from swap during {', '.join(rows)}: {back / GIB:.2f} GiB\n", flush=True)


def ratios(a: Row, b: Row) -> list[float]:
    """a's time over b's, per round."""
    return [x / y for x, y in zip(a.times, b.times, strict=True)]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({', '.join(f'{v:.2f}' for v in values)})"


def print_table(rows: dict[str, Row], reference: Row, speedups: dict[str, str]) -> None:
    print("| row | s per step | speed-up vs eager fp32 (per round) | first call s | setup s | "
          "model GiB | step GiB | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        error = ((row.output - reference.output).norm() / reference.output.norm()).item()
        print(f"| {name} | {statistics.median(row.times):.2f} | {speedups[name]} | "
              f"{row.first_s:.1f} | {row.setup_s:.1f} | {row.model_bytes() / GIB:.2f} | "
              f"{row.step_peak / GIB:.2f} | {error:.2e} |", flush=True)


def measure_size(args, cpu: Engine, preset: Row, size: int) -> None:
    latent = size // cpu.vae_scale_factor
    inputs = unet_inputs(cpu.unet, 2, latent, context_shape(cpu), torch.Generator().manual_seed(0))
    inputs = (*inputs[:1], torch.tensor(500), *inputs[2:])
    name = preset_name(cpu, args.preset)
    native_bf16 = bool(cpu_bf16_support())
    # OpenVINO at the preset's precision ("default" is bf16 where the CPU has it natively)
    peer = "default" if cpu.settings.unet_dtype != "fp32" and native_bf16 else "f32"
    print(f"### {size}x{size}\n")
    if args.lean:
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            openvino = openvino_row(lambda: plain_copy(cpu.unet), cpu, peer, inputs, scratch)
        time_rows({name: preset, f"OpenVINO {peer}": openvino}, inputs, args.rounds)
        openvino.call = None  # its compiled model goes; its times and output stay
        second = {name: Row(preset.call, preset.setup_s, module=cpu.unet),
                  "eager fp32": eager_row(plain_copy(cpu.unet))}
        time_rows(second, inputs, args.rounds)
        reference = second["eager fp32"]
        over_peer = ratios(preset, openvino)
        over_eager = ratios(reference, second[name])
        derived = statistics.median(over_eager) * statistics.median(over_peer)
        rows = {"eager fp32": reference, f"{name} (phase 1)": preset,
                f"{name} (phase 2)": second[name], f"OpenVINO {peer}": openvino}
        speedups = {"eager fp32": "1.00x", f"{name} (phase 1)": "",
                    f"{name} (phase 2)": spread(over_eager),
                    f"OpenVINO {peer}": f"{derived:.2f}x (derived through the preset)"}
        print_table(rows, reference, speedups)
    else:
        rows = {"eager fp32": eager_row(plain_copy(cpu.unet))}
        if native_bf16:
            rows["eager bf16"] = eager_row(copy.deepcopy(rows["eager fp32"].module).bfloat16(),
                                           torch.bfloat16)
        rows[name] = preset
        for precision in ("default", "f32") if native_bf16 else ("f32",):
            rows[f"OpenVINO {precision}"] = openvino_row(lambda: rows["eager fp32"].module,
                                                         cpu, precision, inputs)
        time_rows(rows, inputs, args.rounds)
        reference = rows["eager fp32"]
        print_table(rows, reference, {n: spread(ratios(reference, r)) for n, r in rows.items()})
        over_peer = ratios(preset, rows[f"OpenVINO {peer}"])
    print(f"\nThe preset's time over OpenVINO {peer}'s: {spread(over_peer)}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd15")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lean", action="store_true",
                        help="two phases (preset + OpenVINO, then preset + eager fp32)")
    parser.add_argument("--scratch", default=None,
                        help="with --lean: the folder for OpenVINO's IR (default: the temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a settings override for the preset row (repeatable)")
    args = parser.parse_args()
    started = time.perf_counter()
    overrides = [f"model_id={args.model}", *args.set]
    cpu = Engine(resolve_settings(args.preset, overrides=overrides).settings)
    preset = preset_row(cpu, time.perf_counter() - started)
    drop_all_but_the_unet(cpu)
    print(f"{args.model}, one guided UNet step (batch 2); {os.cpu_count()} CPUs "
          f"({torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{cpu_bf16_support() or 'none'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; `{args.preset}` preset UNet: "
          f"{cpu.settings.unet_dtype} ({cpu.precisions['unet_dtype'].reason})\n")
    for size in args.sizes:
        measure_size(args, cpu, preset, size)
        preset.times, preset.step_peak = [], 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"Process peak resident memory: {peak / GIB:.1f} GiB")


if __name__ == "__main__":
    main()

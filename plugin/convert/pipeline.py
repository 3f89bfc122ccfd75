"""``convert_model``: source directory -> EXL3 directory, one decoder layer at a time.

The flow (exl3-format.md 6.1):

1. plan: which linears to quantize (``families.py``) and at how many bits
   (``allocation.py``);
2. calibration: embed the calibration ids; for each decoder layer, capture the
   inputs of its linears with forward pre-hooks into one Hessian per input
   group, quantize the layer's linears, swap the quantized weights into the
   layer and re-run it, so the next layer is calibrated on what the quantized
   model really produces (error propagation);
3. the output head, calibrated on the final-norm output;
4. write safetensors + configs (``writer.py``).

Every finished layer is saved in ``OUT_DIR/.work`` (``work_dir.py``) and
skipped when a conversion is restarted.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..arch.blocks.moe import all_experts_see_all_tokens
from ..checkpoint import Checkpoint, padded_size
from ..errors import CheckpointError, ConversionError
from ..kernels.weights import Exl3Weight
from .allocation import allocate_bits
from .calibration import calibration_ids
from .families import CalibrationRunner, ConversionPlan, LinearSpec, family_for
from .hessian import HessianAccumulator, PreparedHessian, prepare_hessian
from .options import UNQUANTIZED_HEAD, ConvertOptions
from .quantize_linear import LinearToQuantize, QuantizedLinear, QuantizeOptions, quantize_linears
from .work_dir import WorkDir
from .writer import copy_side_files, quantization_block, tensor_storage, write_configs, write_tensors

CONVERTER = "exl3-triton 0.1.0"
REPORT_FILE = "conversion_report.json"
CALIBRATION_TOKENS_PER_BATCH = 4096


@dataclass
class ConvertProgress:
    stage: str  # "calibrate", "layer", "head", "write", "done"
    done: int
    total: int
    detail: str = ""


ProgressCallback = Callable[[ConvertProgress], None]


@dataclass
class TensorRecord:
    """What the converter knows about one quantized linear (also written to conversion_report.json)."""

    bits: float
    codebook: str
    predicted_error: float  # ||W_q - W|| / ||W|| from the encoder's own values
    proxy_error: float | None
    global_scale: float
    out_scales_applied: bool


@dataclass
class ConversionResult:
    out_dir: Path
    average_bits: float
    records: dict[str, TensorRecord] = field(default_factory=dict)
    resumed_units: list[str] = field(default_factory=list)
    seconds: float = 0.0


def stderr_progress(event: ConvertProgress) -> None:
    """A one-line progress display on stderr (no dependencies)."""
    end = "\n" if event.stage == "done" else ""
    print(f"\r[{event.stage} {event.done}/{event.total}] {event.detail[:90]:<90}", end=end, file=sys.stderr,
          flush=True)


def _record(q: QuantizedLinear) -> TensorRecord:
    return TensorRecord(bits=q.bits, codebook=q.codebook.label, predicted_error=q.predicted_error,
                        proxy_error=q.proxy_error, global_scale=q.global_scale,
                        out_scales_applied=q.out_scales_applied)


def _group_seed(seed: int, name: str) -> torch.Generator:
    # One stream per input group, independent of processing order, so a resumed run draws the same signs.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


class _Converter:
    def __init__(self, in_dir: Path, out_dir: Path, options: ConvertOptions, progress: ProgressCallback | None):
        self.in_dir, self.out_dir, self.options = Path(in_dir), Path(out_dir), options
        self.progress = progress or (lambda event: None)
        self.device = torch.device(options.device)
        self.source = Checkpoint(self.in_dir)
        if self.source.is_exl3:
            raise ConversionError(f"{self.in_dir} is already EXL3-quantized; convert the unquantized model instead")
        self.family = family_for(self.source.architecture, self.source.config_path)
        self.plan: ConversionPlan = self.family.plan(self.source.config, self.source.has_tensor)
        self._check_source()
        self._fused_cache: tuple[str | None, torch.Tensor | None] = (None, None)
        numel = {s.key: self._padded_numel(s) for s in self.plan.body_linears}
        self.allocation = allocate_bits(self.plan.body_linears, numel, options.bits, options.half_steps)
        self.work = WorkDir(self.out_dir, {"source": str(self.in_dir.resolve()), **options.identity()})
        self.result = ConversionResult(out_dir=self.out_dir, average_bits=self.allocation.average)

    # ---------------------------------------------------------------- checks

    def _check_source(self) -> None:
        for spec in self.plan.body_linears:
            name = spec.source.tensor if spec.source else f"{spec.key}.weight"
            if not self.source.has_tensor(name):
                raise CheckpointError("the converter needs this tensor but the source model does not have it",
                                      path=self.in_dir, tensor=name)
            shape = self.source.info(name).shape
            if spec.source is None and len(shape) != 2:
                raise ConversionError(f"tensor '{name}' in {self.in_dir} is not a 2-D linear weight")
            if spec.source is not None and spec.source.index is None:  # row slice of a 2-D weight
                rows = spec.source.rows or (0, shape[0])
                if len(shape) != 2 or rows[1] > shape[0]:
                    raise ConversionError(f"tensor '{name}' in {self.in_dir} has shape {list(shape)}; expected "
                                          f"[rows >= {rows[1]}, in] for {spec.key}")
            elif spec.source is not None:
                rows = spec.source.rows or (0, shape[1] if len(shape) == 3 else 0)
                if len(shape) != 3 or spec.source.index >= shape[0] or rows[1] > shape[1]:
                    raise ConversionError(f"tensor '{name}' in {self.in_dir} has shape {list(shape)}; expected "
                                          f"[experts > {spec.source.index}, rows >= {rows[1]}, in] for {spec.key}")
        head_source = self._head_source_name()
        if not self.source.has_tensor(head_source):
            raise CheckpointError("no output head and no embedding to tie it to", path=self.in_dir, tensor=head_source)

    def _head_source_name(self) -> str:
        return (f"{self.plan.embedding_key}.weight" if self.plan.tied_embeddings else f"{self.plan.head_key}.weight")

    def _source_shape(self, spec: LinearSpec) -> tuple[int, int]:
        """``(out, in)`` of a planned linear."""
        if spec.source is None:
            out_f, in_f = self.source.info(f"{spec.key}.weight").shape
            return out_f, in_f
        shape = self.source.info(spec.source.tensor).shape
        rows, in_f = shape[-2:]
        lo, hi = spec.source.rows or (0, rows)
        return hi - lo, in_f

    def _source_weight(self, spec: LinearSpec) -> torch.Tensor:
        if spec.source is None:
            return self.source.tensor(f"{spec.key}.weight", device=self.device)
        name = spec.source.tensor
        if self._fused_cache[0] != name:  # the experts of one fused tensor come one after another
            self._fused_cache = (name, self.source.tensor(name))
        fused = self._fused_cache[1]
        lo, hi = spec.source.rows or (0, fused.shape[-2])
        if spec.source.index is None:
            return fused[lo:hi].to(self.device)
        return fused[spec.source.index, lo:hi].to(self.device)

    def _padded_numel(self, spec: LinearSpec) -> int:
        out_f, in_f = self._source_shape(spec)
        return padded_size(out_f) * padded_size(in_f)

    def _quant_options(self, bits: float) -> QuantizeOptions:
        return QuantizeOptions(bits=bits, codebook=self.options.codebook_enum, out_scales=self.options.out_scales,
                               scale_search=self.options.scale_search,
                               memory_budget=self.options.memory_budget_mb << 20)

    # ---------------------------------------------------------------- quantizing

    def _to_quantize(self, spec: LinearSpec) -> LinearToQuantize:
        bias_name = f"{spec.key}.bias"
        has_bias = spec.source is None and self.source.has_tensor(bias_name)
        return LinearToQuantize(key=spec.key, weight=self._source_weight(spec),
                                bias=self.source.tensor(bias_name) if has_bias else None)

    def _quantize_layer(self, specs: list[LinearSpec], hessians: dict[str, torch.Tensor | None]) -> list[QuantizedLinear]:
        """Quantize a layer's linears, those sharing an input and a bit width together."""
        results = []
        groups: dict[tuple[str, float], list[LinearSpec]] = {}
        for spec in specs:
            groups.setdefault((spec.input_group, self.allocation.bits[spec.key]), []).append(spec)
        prepared: dict[str, PreparedHessian | None] = {}
        for (input_group, bits), members in groups.items():
            gen = _group_seed(self.options.seed, input_group)
            if input_group not in prepared:
                h = hessians.get(input_group)
                prepared[input_group] = prepare_hessian(h, gen) if h is not None else None
            results += quantize_linears([self._to_quantize(s) for s in members], prepared[input_group],
                                        self._quant_options(bits), gen, device=self.device)
        order = {s.key: i for i, s in enumerate(specs)}
        return sorted(results, key=lambda q: order[q.key])

    def _save_unit(self, unit: str, quantized: list[QuantizedLinear]) -> None:
        tensors = {f"{q.key}.{part}": t for q in quantized for part, t in q.tensors.items()}
        self.work.save_unit(unit, tensors, {q.key: asdict(_record(q)) for q in quantized})

    def _load_unit_records(self, unit: str) -> None:
        for key, rec in self.work.load_records(unit).items():
            self.result.records[key] = TensorRecord(**rec)
        self.result.resumed_units.append(unit)

    # ---------------------------------------------------------------- calibration

    def _calibration_hidden(self, runner: CalibrationRunner, tokenizer) -> torch.Tensor:
        ids = calibration_ids(self.options.cal_rows, self.options.cal_cols, runner.vocab_size,
                              tokenizer, seed=self.options.seed)
        with torch.inference_mode():
            return torch.cat([runner.embed(b.to(self.device)).float().cpu() for b in self._batches(ids)])

    def _batches(self, x: torch.Tensor):
        rows = max(1, CALIBRATION_TOKENS_PER_BATCH // self.options.cal_cols)
        return torch.split(x, rows)

    def _positions(self, batch: torch.Tensor) -> torch.Tensor:
        b, t = batch.shape[:2]
        return torch.arange(t, device=self.device).expand(b, t)

    def _capture_hessians(self, layer: torch.nn.Module, specs: list[LinearSpec],
                          hidden: torch.Tensor, run) -> dict[str, torch.Tensor | None]:
        modules = _linear_modules(layer)
        accumulators: dict[str, HessianAccumulator] = {}
        handles = []
        for spec in specs:
            if spec.input_group in accumulators:
                continue
            module = modules.get(spec.key)
            if module is None:
                raise ConversionError(f"the model's layer has no Linear for '{spec.key}' (adapter and plan disagree)")
            acc = accumulators[spec.input_group] = HessianAccumulator(padded_size(module.in_features), self.device)
            handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
        try:
            with torch.inference_mode(), all_experts_see_all_tokens():
                for batch in self._batches(hidden):
                    run(batch.to(self.device), self._positions(batch))
        finally:
            for h in handles:
                h.remove()
        return {name: acc.finalize() for name, acc in accumulators.items()}

    def _rerun(self, hidden: torch.Tensor, run) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([run(b.to(self.device), self._positions(b)).float().cpu() for b in self._batches(hidden)])

    # ---------------------------------------------------------------- main loop

    def run(self) -> ConversionResult:
        start = time.time()
        self._prepare_out_dir()
        self.work.open()
        n_layers = len(self.plan.layers)
        runner, hidden, first_todo = None, None, 0
        if self.options.calibrate:
            first_todo = self._last_finished_layer() + 1
            if first_todo < n_layers or not self.work.is_done("head"):
                runner, hidden, first_todo = self._start_calibration(first_todo)
        for i, specs in enumerate(self.plan.layers):
            unit = f"layer_{i}"
            self.progress(ConvertProgress("layer", i, n_layers, f"model layer {i}"))
            if self.work.is_done(unit) and (not self.options.calibrate or i < first_todo):
                self._load_unit_records(unit)
                continue
            if runner is not None:
                layer = runner.layer(i)
                hessians = self._capture_hessians(layer, specs, hidden, lambda x, p: runner.run_layer(i, x, p))
                quantized = self._quantize_layer(specs, hessians)
                _swap_in(layer, quantized, self.device)
                hidden = self._rerun(hidden, lambda x, p: runner.run_layer(i, x, p))
                # Tensors first, then the hidden states (which also drops the previous layer's): an
                # interruption in between only costs redoing this layer.
                self._save_unit(unit, quantized)
                self.work.save_hidden(i, hidden)
            else:
                quantized = self._quantize_layer(specs, {})
                self._save_unit(unit, quantized)
            self.result.records.update({q.key: _record(q) for q in quantized})
        self._convert_head(runner, hidden)
        self.progress(ConvertProgress("write", 0, 1, str(self.out_dir)))
        self._write_output()
        self.result.seconds = time.time() - start
        self.progress(ConvertProgress("done", 1, 1, f"{self.out_dir} in {self.result.seconds:.1f} s"))
        return self.result

    def _prepare_out_dir(self) -> None:
        if self.out_dir.resolve() == self.in_dir.resolve():
            raise ConversionError(f"the output directory must differ from the input directory ({self.in_dir})")
        if self.out_dir.exists():
            if not self.out_dir.is_dir():
                raise ConversionError(f"output path {self.out_dir} exists and is not a directory")
            leftovers = [p.name for p in self.out_dir.iterdir() if p.name != ".work"]
            if leftovers:
                raise ConversionError(
                    f"output directory {self.out_dir} is not empty ({', '.join(sorted(leftovers)[:5])}); "
                    "choose a new directory or empty it")
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _last_finished_layer(self) -> int:
        """The last layer whose tensors *and* output hidden states are saved (-1 if none)."""
        last = -1
        for i in range(len(self.plan.layers)):
            if not self.work.is_done(f"layer_{i}"):
                break
            last = i
        while last >= 0 and self.work.load_hidden(last) is None:
            last -= 1
        return last

    def _start_calibration(self, first_todo: int) -> tuple[CalibrationRunner, torch.Tensor, int]:
        from ..model import load

        self.progress(ConvertProgress("calibrate", 0, 1, f"loading {self.in_dir}"))
        model = load(self.in_dir, device=self.device, dtype=torch.float32, backend="reference")
        runner = self.family.runner(model)
        if first_todo > 0:
            hidden = self.work.load_hidden(first_todo - 1)
            # Finished layers are not re-quantized, but the head needs the quantized model's hidden states,
            # which are saved; the layers themselves stay as loaded (unused from here on).
            return runner, hidden, first_todo
        self.progress(ConvertProgress("calibrate", 0, 1, "embedding calibration tokens"))
        return runner, self._calibration_hidden(runner, model.tokenizer), 0

    # ---------------------------------------------------------------- head

    def _convert_head(self, runner: CalibrationRunner | None, hidden: torch.Tensor | None) -> None:
        self.progress(ConvertProgress("head", 0, 1, self.plan.head_key))
        if self.options.head_bits == UNQUANTIZED_HEAD:
            return
        if self.work.is_done("head"):
            self._load_unit_records("head")
            return
        hessian = None
        if runner is not None and hidden is not None:
            width = self.source.info(self._head_source_name()).shape[1]
            acc = HessianAccumulator(padded_size(width), self.device)
            with torch.inference_mode():
                for batch in self._batches(hidden):
                    acc.add(runner.head_input(batch.to(self.device)))
            hessian = acc.finalize()
        gen = _group_seed(self.options.seed, self.plan.head_key)
        prepared = prepare_hessian(hessian, gen) if hessian is not None else None
        source = self._head_source_name()
        lin = LinearToQuantize(self.plan.head_key, self.source.tensor(source, device=self.device))
        quantized = quantize_linears([lin], prepared, self._quant_options(float(self.options.head_bits)), gen,
                                     device=self.device)
        self._save_unit("head", quantized)
        self.result.records.update({q.key: _record(q) for q in quantized})

    # ---------------------------------------------------------------- output

    def _write_output(self) -> None:
        quantized_keys = {s.key for s in self.plan.body_linears}
        fused_sources = {s.source.tensor for s in self.plan.body_linears if s.source is not None}
        head_quantized = self.options.head_bits != UNQUANTIZED_HEAD
        units = [f"layer_{i}" for i in range(len(self.plan.layers))] + (["head"] if head_quantized else [])
        quantized_tensors: dict[str, dict[str, torch.Tensor]] = {}
        for unit in units:
            for name, t in self.work.load_tensors(unit).items():
                quantized_tensors.setdefault(name.rpartition(".")[0], {})[name] = t

        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(self.source.tensor_names(), key=self.family.tensor_sort_key):
            if name in fused_sources:  # written as one quantized linear per expert instead
                continue
            key = name.rpartition(".")[0]
            if key in quantized_keys or (key == self.plan.head_key):
                if key in quantized_tensors:
                    tensors.update(quantized_tensors.pop(key))
                continue
            tensors[name] = self.source.tensor(name)  # unquantized tensors stay as stored (bf16 stays bf16)
        for key, parts in quantized_tensors.items():  # the head of a tied model, experts cut from fused tensors
            tensors.update(parts)
        # stable: tensors of one module keep their part order, leftovers join their layer
        tensors = {name: tensors[name] for name in sorted(tensors, key=lambda n: self.family.tensor_sort_key(n)[:3])}
        if not head_quantized:
            head = self.source.tensor(self._head_source_name()).to(torch.float16)
            tensors[f"{self.plan.head_key}.weight"] = head

        bits = {k: r.bits for k, r in self.result.records.items()}
        write_tensors(tensors, self.out_dir, self.options.shard_size_mb << 20)
        block = quantization_block(
            bits=self.allocation.average, head_bits=self.options.head_bits, cal_rows=self.options.cal_rows,
            cal_cols=self.options.cal_cols, out_scales=self.options.out_scales, codebook=self.options.codebook,
            converter=CONVERTER)
        if not self.options.calibrate:
            block["calibration"] = {"rows": 0, "cols": 0}
        write_configs(self.source.config, block, tensor_storage(tensors, bits), self.out_dir)
        copy_side_files(self.in_dir, self.out_dir)
        report = {k: asdict(r) for k, r in self.result.records.items()}
        (self.out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
        shutil.rmtree(self.work.path, ignore_errors=True)


def _linear_modules(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The project's ``Linear`` modules inside ``layer``, by the module key of the weight they hold."""
    from ..arch.blocks.linear import Linear

    return {m.weight.key: m for m in layer.modules() if isinstance(m, Linear)}


def _swap_in(layer: torch.nn.Module, quantized: list[QuantizedLinear], device: torch.device) -> None:
    """Replace the layer's dense ``Linear``s by ones holding the quantized weights (public constructor only)."""
    from ..arch.blocks.linear import Linear

    by_key = {q.key: q for q in quantized}
    for name, module in list(layer.named_modules()):
        if not isinstance(module, Linear) or module.weight.key not in by_key:
            continue
        q = by_key[module.weight.key]
        t = q.tensors
        weight = Exl3Weight(trellis=t["trellis"], suh=t["suh"], svh=t["svh"], bits=q.bits, codebook=q.codebook,
                            bias=t.get("bias"), key=q.key)
        parent_name, _, attr = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        setattr(parent, attr, Linear(weight, module.in_features, module.out_features, module.options))


def convert_model(
    in_dir: str | Path,
    out_dir: str | Path,
    options: ConvertOptions,
    progress: ProgressCallback | None = None,
) -> ConversionResult:
    """Convert the unquantized model in ``in_dir`` to EXL3 in ``out_dir`` (see ``ConvertOptions``).

    Resumes from ``out_dir/.work`` when a previous run with the same options
    was interrupted. Raises ``CheckpointError`` / ``ConfigError`` for a bad
    source, ``UnsupportedArchitectureError``, ``InvalidArgumentError`` for bad
    options and ``ConversionError`` for an unusable output directory.
    """
    return _Converter(Path(in_dir), Path(out_dir), options, progress).run()

"""The trained weights of a DeepSpeed checkpoint, read one tensor at a time.

DeepSpeed's own consolidation (zero_to_fp32) concatenates every rank's fp32 partition into one vector for
ZeRO-1/2 and loads the 16-bit module states whole: two or three full copies of the model in the exporting
process. Here each weight is assembled from the slices of the rank partitions that hold it, straight out of
memory-mapped checkpoint files, and the mapped pages are handed back to the kernel once the weight is
copied, so the reader holds about one weight at a time.

Where the checkpoint's weights come from:
- ZeRO-0: the module states (the weights in the training dtype).
- ZeRO-1/2: the module states hold every weight in the training dtype (rank 0 saves them after each step's
  all-gather); the fp32 master copies are split over the ranks' optimizer files. The module states are
  enough when they are as precise as the export (`module_is_exact`), and then the optimizer files (three
  quarters of a checkpoint's bytes) need not even be downloaded.
- ZeRO-3: each parameter is split evenly over the ranks (padded to a multiple of the world size); the fp32
  master slices sit in the ranks' optimizer files, in parameter order.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
from collections import OrderedDict

from rayft.training.checkpoints import DS_TAG

OPTIM_FILES = "*zero_pp_rank_*_mp_rank_*_optim_states.pt"
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def module_is_exact(training_precision: str, export_dtype: str) -> bool:
    """Whether the 16-bit (or fp32) weights of the module states equal the fp32 masters cast to the export
    dtype: fp32 training keeps no separate masters, and bf16 weights are the masters rounded to bf16."""
    trained = {"bf16": "bfloat16", "fp16": "float16"}.get(training_precision, "float32")
    return trained == "float32" or trained == export_dtype


def _rank_of(path: str) -> int:
    name = os.path.basename(path)
    return int(name.split("zero_pp_rank_")[1].split("_")[0])


class CheckpointWeights:
    """names(): every saved weight and persistent buffer, in the model's order, with its shape;
    tensor(name): that weight as a new tensor (fp32 from the masters, else the saved dtype)."""

    def __init__(self, ckpt_dir: str, zero_stage: int, masters: bool = True):
        import torch

        self.dir = os.path.join(ckpt_dir, DS_TAG)
        self.stage = zero_stage
        self.masters = masters or zero_stage == 3  # ZeRO-3 module states hold no weights at all
        self._maps = _Mappings()
        load = self._load
        if zero_stage <= 2:
            self.model_states = [load(os.path.join(self.dir, "mp_rank_00_model_states.pt"))]
        if zero_stage == 3:
            files = sorted(glob.glob(os.path.join(self.dir, "zero_pp_rank_*_mp_rank_00_model_states.pt")), key=_rank_of)
            self.model_states = [load(f) for f in files]
        first = self.model_states[0]
        self.module = first["module"]
        buffers = set(first.get("buffer_names") or ())
        self.shared = dict(first.get("shared_params") or {})  # alias -> the name it shares storage with
        self.world = len(self.model_states)
        self._where: dict[str, tuple] = OrderedDict()
        if zero_stage == 0:
            for name, value in self.module.items():
                self._where[name] = ("module", name, value.shape)
            return
        # Parameters trained by DeepSpeed, by optimizer group; frozen ones (none in a full finetune) after them.
        groups = first["param_shapes"]
        optim = []
        if self.masters:
            files = sorted(glob.glob(os.path.join(self.dir, OPTIM_FILES)), key=_rank_of)
            if not files:
                raise FileNotFoundError(f"{self.dir}: no ZeRO optimizer files ({OPTIM_FILES})")
            for f in files:
                state = load(f)["optimizer_state_dict"]
                state.pop("optimizer_state_dict", None)  # Adam's moments: never touched, never paged in
                optim.append(state)
            self.world = len(files)
        for name in self.module:
            if name in buffers:
                self._where[name] = ("module", name, self.module[name].shape)
        if zero_stage <= 2:
            paddings = optim[0].get("param_alignment_paddings") if optim else None
            for g, shapes in enumerate(groups):
                parts = [o["single_partition_of_fp32_groups"][g] for o in optim] if optim else None
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    n = math.prod(shape)
                    if self.masters:
                        self._where[name] = ("flat", parts, offset, n, torch.Size(shape))
                    else:
                        self._where[name] = ("module", name, torch.Size(shape))
                    offset += n + (paddings[g][i] if paddings else 0)
        else:
            flat = [o["fp32_flat_groups"] for o in optim]
            sizes = [t.numel() for t in flat[0]]
            starts = [0, *itertools.accumulate(sizes)]
            offset = 0
            for shapes in groups:
                for name, shape in shapes.items():
                    n = math.prod(shape)
                    per_rank = math.ceil(n / self.world)
                    self._where[name] = ("zero3", flat, starts, offset, per_rank, n, torch.Size(shape))
                    offset += per_rank
        for name, shape in (first.get("frozen_param_shapes") or {}).items():
            fragments = [m["frozen_param_fragments"][name] for m in self.model_states]
            self._where[name] = ("frozen", fragments, math.prod(shape), torch.Size(shape))

    def _load(self, path: str):
        import torch

        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        self._maps.add(path)
        return state

    def names(self) -> dict:
        """name -> torch.Size of every weight and buffer the checkpoint holds (shared aliases included)."""
        out = {name: where[-1] for name, where in self._where.items()}
        for alias, name in self.shared.items():
            if name in out:
                out.setdefault(alias, out[name])
        return out

    def tensor(self, name: str):
        """The weight `name`, assembled from the slices that hold it, as a new contiguous tensor."""
        import torch

        name = name if name in self._where else self.shared.get(name, name)
        where = self._where[name]
        kind = where[0]
        if kind == "module":
            value = self.module[where[1]]
            out = value.clone()
            self._maps.release(value)
            return out
        if kind == "flat":
            _, parts, offset, n, shape = where
            per = parts[0].numel()
            pieces, pos = [], offset
            while pos < offset + n:
                rank, local = divmod(pos, per)
                take = min(per - local, offset + n - pos)
                pieces.append(parts[rank].narrow(0, local, take))
                pos += take
            out = torch.cat(pieces).view(shape) if len(pieces) > 1 else pieces[0].clone().view(shape)
            for p in pieces:
                self._maps.release(p)
            return out
        if kind == "zero3":
            _, flat, starts, offset, per_rank, n, shape = where
            pieces = []
            for groups in flat:
                pos, end = offset, offset + per_rank
                while pos < end:
                    g = max(i for i in range(len(starts) - 1) if starts[i] <= pos)
                    take = min(starts[g + 1], end) - pos
                    pieces.append(groups[g].narrow(0, pos - starts[g], take))
                    pos += take
            out = torch.cat(pieces)[:n].view(shape)  # a new tensor already: cat copies
            for p in pieces:
                self._maps.release(p)
            return out
        _, fragments, n, shape = where
        out = torch.cat([f.reshape(-1) for f in fragments])[:n].view(shape).clone()
        for f in fragments:
            self._maps.release(f)
        return out


class _Mappings:
    """The address ranges of the memory-mapped checkpoint files, so that the pages behind a tensor already
    copied can be returned to the kernel (madvise DONTNEED). Only clean, file-backed pages inside these
    ranges are ever released: touching them again reads the file again. Elsewhere, and off Linux, a no-op."""

    def __init__(self):
        self.paths: set[str] = set()
        self.ranges: list[tuple[int, int]] | None = None
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.libc = None
        try:
            import ctypes

            self.libc = ctypes.CDLL(None, use_errno=True)
            self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            self.libc = None

    def add(self, path: str) -> None:
        self.paths.add(os.path.realpath(path))
        self.ranges = None

    def _read_ranges(self) -> list[tuple[int, int]]:
        ranges = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].strip() in self.paths:
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        ranges.append((lo, hi))
        except OSError:
            pass
        return ranges

    def release(self, tensor) -> None:
        if self.libc is None or tensor.numel() == 0:
            return
        if self.ranges is None:
            self.ranges = self._read_ranges()
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        lo = -(-start // self.page) * self.page  # whole pages inside the tensor only
        hi = end // self.page * self.page
        if hi <= lo or not any(a <= lo and hi <= b for a, b in self.ranges):
            return
        self.libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED

"""torch.export ExportedPrograms (FILE.pt2): loaded with torch.export.load under the safe-loading policy."""
from __future__ import annotations

import logging
import os

from mealkd.core.checkpoint_io import TRUST_ENV
from mealkd.core.models._helpers import LoadedModel, check_and_load, class_mismatch, checkpoint_class_names, read_state_dict, recorded_norm, resolve_meta, file_sha256
from mealkd.core.models.spec import INIT_MODES, ModelSpec
from mealkd.core.models.torchscript_models import _torchscript_classes
from mealkd.errors import MissingFile, UserError, first_line




# ---------------------------------------------------------------- torch.export (.pt2)
def _fixed_mode_train(self, mode: bool = True):
    """``train()``/``eval()`` of an ExportedProgram's module: only the ``training`` flags change. The graph
    runs as it was exported (export captures eval behaviour: BatchNorm uses its running statistics,
    dropout is off); torch refuses train()/eval() on such modules, which would break every caller."""
    import torch

    return torch.nn.Module.train(self, mode)


def _exported_input_size(program, spec: ModelSpec) -> int | None:
    """The square H = W of the program's (first) example input if static, None if dynamic; UserError if
    the program's batch dimension is fixed (mealkd feeds batches of any size) or H != W."""
    names = list(program.graph_signature.user_inputs)
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and names and n.name == names[0]), None)
    val = node.meta.get("val") if node is not None else None
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) != 4:
        raise UserError(f"ExportedProgram {spec.weights_file} does not take one (batch, 3, H, W) image tensor "
                        f"(its first input is {tuple(shape) if shape is not None else 'not a tensor'}); export an image classifier")
    static = [isinstance(d, int) for d in shape]  # a dynamic dimension is a torch.SymInt
    if static[0]:
        raise UserError(f"ExportedProgram {spec.weights_file} was exported for a fixed batch of {int(shape[0])}: export it "
                        "with a dynamic batch, e.g. torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), "
                        "or use `mealkd export --format pt2`")
    if not (static[2] and static[3]):
        return None
    h, w = int(shape[2]), int(shape[3])
    if h != w:
        raise UserError(f"ExportedProgram {spec.weights_file} takes {h}x{w} images but mealkd feeds square crops: export it at "
                        "a square size (or with dynamic H/W and give :size=N)")
    if spec.size is not None and spec.size != h:
        raise UserError(f"{spec.text}: :size={spec.size} but the program was exported for {h}x{h} inputs only; drop :size "
                        "or export it at that size (or with dynamic H/W)")
    return h


def _export_load(spec: ModelSpec):
    """(ExportedProgram, resolved path) of a ``.pt2`` spec; the weights inside are read with torch.load
    forced to weights_only (mealkd's policy) unless MEALKD_TRUST_CHECKPOINTS=1."""
    import torch

    from mealkd.core.checkpoint_io import trusted

    file = spec.weights_file or ""
    path = os.path.expanduser(file)
    if not os.path.isfile(path):
        raise MissingFile(f"ExportedProgram file {file} does not exist: check the path")
    key, old = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    if not trusted():
        os.environ[key] = "1"  # torch.export.load falls back to full unpickling otherwise
    quiet = [logging.getLogger(name) for name in ("torch.export", "torch._export.serde.serialize")]
    levels = [q.level for q in quiet]
    for q in quiet:  # torch logs a traceback before raising on a bad file; the UserError below says it in one line
        q.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(path), path
    except Exception as e:  # noqa: BLE001
        hint = "" if trusted() else f" (if it holds Python objects that you trust, set {TRUST_ENV}=1)"
        raise UserError(f"{file} is not a torch.export ExportedProgram file ({first_line(e, 300)}); save one with "
                        f"torch.export.save, or `mealkd export --format pt2`{hint}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def load_exported(spec: ModelSpec, num_classes: int | None, init: str) -> LoadedModel:
    """The program's module as saved (init weights/pretrained), or with a checkpoint's state dict loaded
    into it (init=<path>: a .pt2 student trained by ``distill``). Like TorchScript, it cannot be rebuilt."""
    import types

    if init == "scratch":
        raise UserError(f"{spec.text} is an ExportedProgram file, which cannot be re-initialised (init=scratch): "
                        "use init=pretrained to start from its weights, or an architecture spec such as torchvision:ARCH")
    program, path = _export_load(spec)
    recorded = _exported_input_size(program, spec)
    try:
        module = program.module()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"ExportedProgram {spec.weights_file}: torch cannot turn it into a module ({first_line(e, 300)})") from None
    module.train = types.MethodType(_fixed_mode_train, module)
    module.eval = types.MethodType(lambda self: _fixed_mode_train(self, False), module)
    names: list[str] | None = None
    norm: tuple = recorded_norm({}, path)  # `mealkd export --format pt2` records mean/std beside the file
    if init not in INIT_MODES:
        sd, outer, path = read_state_dict(init, "init file", spec.text)  # weights (and their sha) from the checkpoint
        check_and_load(module, sd, what="init file", path=path, spec_text=spec.text, head=None, want=None)
        norm = recorded_norm(outer, path)
    size, mean, std = resolve_meta(spec, recorded, None, None, norm)
    n = _torchscript_classes(module, spec, size, kind="ExportedProgram")
    if init not in INIT_MODES:
        names = checkpoint_class_names(outer, n, path)
    if num_classes is not None and int(num_classes) != n:
        raise class_mismatch(spec, n, int(num_classes))
    return LoadedModel(spec, module, n, size, mean, std, file_sha256(path), names, False, path, size_fixed=recorded is not None)

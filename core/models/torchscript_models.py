"""TorchScript files (FILE.pt): used as they are; a distill checkpoint's state dict loads into them."""
from __future__ import annotations

import os
import warnings

from mealkd.core.checkpoint_io import torch_archive
from mealkd.core.models._helpers import LoadedModel, check_and_load, class_mismatch, checkpoint_class_names, read_state_dict, recorded_norm, resolve_meta, file_sha256
from mealkd.core.models.spec import INIT_MODES, ModelSpec
from mealkd.errors import MissingFile, UserError, first_line




# ---------------------------------------------------------------- TorchScript
def _jit_load(spec: ModelSpec):
    """(scripted module, resolved path) of a TorchScript spec."""
    import torch

    file = spec.weights_file or ""
    path = os.path.expanduser(file)
    if not os.path.isfile(path):
        raise MissingFile(f"TorchScript file {file} does not exist: check the path")
    try:
        with warnings.catch_warnings():  # "torch.jit.load is deprecated" is not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu"), path
    except Exception as e:  # noqa: BLE001
        if torch_archive(path) == "pickle":  # torch.save's archive (a state dict or checkpoint), not torch.jit.save's
            raise UserError(f"{file} is a state dict or checkpoint (torch.save), not a TorchScript file: name its architecture, "
                            f"e.g. torchvision:ARCH@{file}") from None
        raise UserError(f"{file} is not a TorchScript file ({first_line(e, 300)}); for a state dict, name its "
                        f"architecture: torchvision:ARCH@{file}") from None


def _torchscript_classes(module, spec: ModelSpec, size: int | None, kind: str = "TorchScript") -> int:
    """The class count of a scripted (or exported) classifier, from one forward pass on a zero image."""
    import torch

    file, probe = spec.weights_file, size or 224
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, probe, probe))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot run {kind} model {file} on a 1x3x{probe}x{probe} float input to "
                        f"find its class count ({first_line(e, 300)}): pass the input size, e.g. {spec.text}:size=N") from None
    finally:
        module.train(was_training)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{kind} model {file} returns {shape}, not (batch, classes) logits")
    return int(out.shape[1])


def load_torchscript(spec: ModelSpec, num_classes: int | None, init: str) -> LoadedModel:
    """The scripted module as saved (init weights/pretrained), or the scripted module with the state
    dict of a checkpoint loaded into it (init=<path>: a TorchScript student trained by ``distill``,
    whose checkpoint holds the scripted module's state dict)."""
    if init == "scratch":
        raise UserError(f"{spec.text} is a TorchScript file, which cannot be re-initialised (init=scratch): "
                        "use init=pretrained to start from its weights, or an architecture spec such as torchvision:ARCH")
    module, path = _jit_load(spec)
    names: list[str] | None = None
    recorded: tuple = (None, None)
    if init not in INIT_MODES:
        sd, outer, path = read_state_dict(init, "init file", spec.text)
        check_and_load(module, sd, what="init file", path=path, spec_text=spec.text, head=None, want=None)
        recorded = recorded_norm(outer, path)
    size, mean, std = resolve_meta(spec, None, None, None, recorded)
    n = _torchscript_classes(module, spec, size)
    if init not in INIT_MODES:
        names = checkpoint_class_names(outer, n, path)
    if num_classes is not None and int(num_classes) != n:
        raise class_mismatch(spec, n, int(num_classes))
    return LoadedModel(spec, module, n, size, mean, std, file_sha256(path), names, False, path)

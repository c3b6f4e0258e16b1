"""Model specs: one grammar for teachers (stage one) and students (stage two).

A *spec* names a model and, optionally, how to feed it::

    torchvision:ARCH                 torchvision architecture + its DEFAULT weights, read ONLY from the
                                     local torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``)
    torchvision:ARCH@WEIGHTS         another weights enum member of ARCH, e.g. ``resnet50@IMAGENET1K_V2``
                                     (an all-caps name without '.' or '/'), also from the hub cache
    torchvision:ARCH@FILE.pth        ARCH + a state dict file (plain, or under 'model'/'state_dict';
                                     'module.' / '_orig_mod.' prefixes are stripped); the class count
                                     is read from the file's classifier weight
    timm:ARCH[@FILE]                 the same through timm (only if timm is installed)
    FILE.pt                          a TorchScript archive (torch.jit.load); also ``torchscript:PATH``
                                     for names that would otherwise be ambiguous
    FILE.pt2                         a torch.export ExportedProgram (torch.export.save; loaded with
                                     torch.export.load and used as ``.module()``); also ``export:PATH``.
                                     Its input size is ``:size=N``, else the example input's H x W
                                     recorded in the program (a dynamic H/W: the run's crop size)

followed by options, each introduced by ``:``::

    :w=0.5                           weight in the ensemble average (default 1, must be > 0)
    :size=224                        input size in pixels (see "Input size" below)
    :mean=0.485/0.456/0.406          per-channel mean ('/'-separated; one value = all channels)
    :std=0.229/0.224/0.225           per-channel std

Input size (one rule for every source): a model's input size is its ``:size=N`` if given; else,
for an architecture that only accepts one size (a ViT: from its position embedding), that size;
else None, which means "the crop size of the run": precompute's ``--image-size`` (the size the
store records) for a teacher, the training size for a student. In particular, a hub-cache
torchvision/timm teacher does NOT get its weights' own eval crop (e.g. 380 for efficientnet_b4):
``torchvision:ARCH`` and ``torchvision:ARCH@FILE.pth`` see the same pixels. Mean/std do come from
the weights' metadata where there is some (else ImageNet's), unless ``:mean``/``:std`` are given.

``--teachers`` takes a comma-separated list of specs (:func:`parse_spec_list`). Limitations, by
design: a path may not contain ',' (the list separator); a path component after the first may not
look like ``word=...`` (it would be read as an option); a bare file name whose part before a ':' is
a plain word (``mymodel:v2.pt``) is read as an unknown source — write ``./mymodel:v2.pt`` or
``torchscript:mymodel:v2.pt``.

inception_v3 / googlenet are always built without auxiliary heads and with transform_input=True
(torchvision's pretrained convention), so a checkpoint of a model built here round-trips.

Nothing here downloads: missing weights are a :class:`UserError` naming the file to place.
Everything user-fixable raises :class:`mealkd.errors.UserError` with a one-line message.
torch/torchvision are imported lazily so that parsing specs (and ``mealkd --help``) stays cheap.

The package has one module per concept: ``spec`` (the grammar), ``_helpers`` (LoadedModel, safe
weights-file reading, strict loading, head discovery), ``torchvision_models``, ``timm_models``,
``torchscript_models`` and ``exported_models`` (one loader each); :func:`load_model` dispatches.
"""

from __future__ import annotations

import logging

from mealkd.core.models._helpers import LoadedModel, describe, file_sha256
from mealkd.core.models.exported_models import load_exported
from mealkd.core.models.spec import FILE_SOURCES, IMAGENET_MEAN, IMAGENET_STD, INIT_MODES, SOURCES, ModelSpec, parse_spec, parse_spec_list
from mealkd.core.models.timm_models import load_timm
from mealkd.core.models.torchscript_models import load_torchscript
from mealkd.core.models.torchvision_models import hub_weights_path, load_torchvision
from mealkd.errors import UserError


log = logging.getLogger(__name__)


def _resolve_init(init: str) -> str:
    if not isinstance(init, str) or not init:
        raise UserError(f"init must be one of {', '.join(INIT_MODES)} or a checkpoint path, got {init!r}")
    return init


def load_model(spec: ModelSpec | str, *, num_classes: int | None = None,
               init: str = "weights") -> LoadedModel:
    """Build the model a spec names.

    init="weights"    the spec's own weights (hub cache / enum / @FILE / .pt); the module is put in
                      eval() mode (teacher behaviour). num_classes, if given, must match.
    init="pretrained" the spec's own weights too, but if num_classes differs from theirs, everything
                      except the classifier is loaded and the head is re-initialised
                      (``head_reinitialized=True``, logged).
    init="scratch"    the architecture with num_classes outputs and random initialisation.
    init=<path>       a state dict / checkpoint loaded strictly into the architecture built with
                      num_classes (inferred from the file when None); it takes precedence over a
                      spec's own '@FILE'/'@WEIGHTS' (a student reloaded from its checkpoint).
                      For a TorchScript (.pt) or ExportedProgram (.pt2) spec the file is the
                      architecture: the checkpoint's state dict is loaded into it (such a student's
                      ``distill`` checkpoint).
    Every file is read through :func:`core.checkpoint_io.load_torch_file` (weights_only policy).
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    init = _resolve_init(init)
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if init not in INIT_MODES and (spec.weights_file or spec.weights_enum) and spec.source not in FILE_SOURCES:
        # e.g. a student trained from ARCH@start.pth, reloaded from its own checkpoint
        log.info("%s: loading weights from init file %s instead of the spec's '@...'", spec.text, init)
    if init == "scratch" and (spec.weights_file or spec.weights_enum) and spec.source not in FILE_SOURCES:
        raise UserError(f"spec {spec.text} names weights but init is 'scratch': drop the '@...' part "
                        "or use init=pretrained")
    if spec.source == "torchvision":
        loaded = load_torchvision(spec, num_classes, init)
    elif spec.source == "timm":
        loaded = load_timm(spec, num_classes, init)
    elif spec.source == "export":
        loaded = load_exported(spec, num_classes, init)
    else:
        loaded = load_torchscript(spec, num_classes, init)
    if init == "weights":
        loaded.module.eval()
    return loaded


__all__ = [
    "FILE_SOURCES", "IMAGENET_MEAN", "IMAGENET_STD", "INIT_MODES", "SOURCES", "LoadedModel", "ModelSpec", "describe", "file_sha256", "hub_weights_path",
    "load_model", "parse_spec", "parse_spec_list",
]

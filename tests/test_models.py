"""core.models: spec grammar and model loading, with real (small) models and real files."""

import hashlib
import json
import sys
import warnings

import pytest
import torch
import torchvision

from mealkd.core.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    describe,
    file_sha256,
    load_model,
    parse_spec,
    parse_spec_list,
)
from mealkd.errors import UserError

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A hermetic, empty torch hub cache."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert torch.hub.get_dir() == str(home / "hub")
    return home


def make_resnet18(num_classes=10, seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def outputs(module, x=X32):
    module.eval()
    with torch.no_grad():
        return module(x)


# ------------------------------------------------------------------ parsing
def test_parse_valid_specs():
    s = parse_spec("torchvision:resnet50")
    assert s == ModelSpec(text="torchvision:resnet50", source="torchvision", arch="resnet50",
                          weights_file=None)
    assert s.weight == 1.0 and s.size is None and s.mean is None and s.std is None

    s = parse_spec(" torchvision:ResNet18@/data/my run/ck.pth:w=0.5:size=160"
                   ":mean=0.5/0.4/0.3:std=0.2/0.25/0.3 ")
    assert (s.source, s.arch, s.weights_file) == ("torchvision", "resnet18", "/data/my run/ck.pth")
    assert (s.weight, s.size, s.mean, s.std) == (0.5, 160, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert s.text.startswith("torchvision:ResNet18@")

    s = parse_spec("torchvision:resnet50@IMAGENET1K_V2:w=2")
    assert (s.weights_enum, s.weights_file, s.weight) == ("IMAGENET1K_V2", None, 2.0)

    s = parse_spec("timm:convnext_tiny.fb_in1k@ck.pth:std=0.5")
    assert (s.source, s.arch, s.weights_file, s.std) == ("timm", "convnext_tiny.fb_in1k", "ck.pth",
                                                         (0.5, 0.5, 0.5))
    s = parse_spec("models/teacher.pt:w=3")
    assert (s.source, s.arch, s.weights_file, s.weight) == ("torchscript", None, "models/teacher.pt", 3.0)
    # A path whose components contain ':' and '=' (not after a ':') stays a path.
    assert parse_spec("torchscript:run:3.bin").weights_file == "run:3.bin"
    assert parse_spec("./a:b/lr=0.1.pt").weights_file == "./a:b/lr=0.1.pt"
    assert parse_spec("lr=0.1.pt").weights_file == "lr=0.1.pt"
    assert parse_spec("torchvision:resnet18@runs/lr=0.1/ck.pth:size=64").weights_file == "runs/lr=0.1/ck.pth"


@pytest.mark.parametrize("text", [
    "", "   ", "resnet18", "hf:some/model", "torchvision:", "torchvision:@x.pth",
    "torchvision:resnet18@", "torchvision:resnet18:w=0", "torchvision:resnet18:w=-1",
    "torchvision:resnet18:w=abc", "torchvision:resnet18:w=inf", "torchvision:resnet18:w=nan",
    "torchvision:resnet18:size=0", "torchvision:resnet18:size=22.5",
    "torchvision:resnet18:mean=0.1/0.2", "torchvision:resnet18:std=0/1/1",
    "torchvision:resnet18:mean=a/b/c", "torchvision:resnet18:bogus=1",
    "torchvision:resnet18:w=1:w=2", "torchvision:res net", "torchvision:resnet18:oops:w=1",
    "a.pt,b.pt", ":w=1", "torchscript:",
])
def test_parse_malformed(text):
    with pytest.raises(UserError) as e:
        parse_spec(text)
    one_line_error(e)


def test_parse_spec_list():
    specs = parse_spec_list("torchvision:resnet18:w=2, ./dir/a.pt ,timm:vit_small@/x/y.pth:size=224")
    assert [s.source for s in specs] == ["torchvision", "torchscript", "timm"]
    assert specs[0].weight == 2 and specs[1].weights_file == "./dir/a.pt"
    assert specs[2].weights_file == "/x/y.pth" and specs[2].size == 224
    for bad in ["", " ", "a.pt,,b.pt", "a.pt,", "torchvision:resnet18,foo"]:
        with pytest.raises(UserError) as e:
            parse_spec_list(bad)
        one_line_error(e)
    with pytest.raises(UserError, match="'/'") as e:
        parse_spec_list("torchvision:resnet18:mean=0.485,0.456,0.406")
    one_line_error(e)


# ------------------------------------------------------------------ torchvision@FILE
@pytest.mark.parametrize("wrap", ["plain", "ddp", "model", "state_dict"])
def test_torchvision_state_dict_file(tmp_path, wrap):
    ref = make_resnet18(10)
    sd = ref.state_dict()
    if wrap == "ddp":
        obj = {"module." + k: v for k, v in sd.items()}
    elif wrap == "model":
        obj = {"model": sd, "epoch": 3, "class_names": [f"c{i}" for i in range(10)]}
    elif wrap == "state_dict":
        obj = {"state_dict": sd, "optimizer": {"lr": 0.1}}
    else:
        obj = sd
    path = tmp_path / "ck.pth"
    torch.save(obj, path)

    lm = load_model(parse_spec(f"torchvision:resnet18@{path}:w=0.25"))
    assert lm.num_classes == 10 and lm.module.fc.out_features == 10
    assert not lm.module.training  # teacher -> eval
    assert torch.equal(outputs(lm.module), outputs(ref))
    assert lm.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(str(path))
    assert lm.input_size is None and lm.mean == IMAGENET_MEAN and lm.std == IMAGENET_STD
    assert lm.class_names == ([f"c{i}" for i in range(10)] if wrap == "model" else None)
    d = describe(lm)
    json.dumps(d)
    assert d["spec"] == f"torchvision:resnet18@{path}:w=0.25" and d["weight"] == 0.25
    assert d["weights_sha256"] == lm.weights_sha256 and d["num_classes"] == 10


def test_torchvision_file_options_and_class_count_check(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save(make_resnet18(10).state_dict(), path)
    lm = load_model(f"torchvision:resnet18@{path}:size=48:mean=0.5/0.5/0.5:std=0.25/0.25/0.25",
                    num_classes=10)
    assert (lm.input_size, lm.mean, lm.std) == (48, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(UserError, match="predicts 10 classes but the dataset/store has 5") as e:
        load_model(f"torchvision:resnet18@{path}", num_classes=5)
    one_line_error(e)


def test_squeezenet_conv_classifier(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.squeezenet1_0(num_classes=7).eval()
    path = tmp_path / "sq.pth"
    torch.save(ref.state_dict(), path)
    lm = load_model(f"torchvision:squeezenet1_0@{path}")
    assert lm.num_classes == 7 and lm.module.classifier[1].out_channels == 7
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(outputs(lm.module, x), outputs(ref, x))


def test_torchvision_file_errors(tmp_path):
    with pytest.raises(UserError, match="nope.pth") as e:
        load_model(f"torchvision:resnet18@{tmp_path}/nope.pth")
    one_line_error(e)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="garbage.pth.*not a PyTorch file") as e:
        load_model(f"torchvision:resnet18@{garbage}")
    one_line_error(e)
    image = tmp_path / "photo.jpg"  # told what it is, not "holds Python objects ... if you trust it, set MEALKD_TRUST_CHECKPOINTS=1"
    image.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    with pytest.raises(UserError, match=r"photo.jpg: not a PyTorch file \(it is a JPEG image\)") as e:
        load_model("torchvision:resnet18", num_classes=3, init=str(image))
    assert "TRUST" not in str(e.value)

    other = tmp_path / "other.pth"  # a squeezenet state dict given to resnet18
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), other)
    with pytest.raises(UserError, match="another architecture") as e:
        load_model(f"torchvision:resnet18@{other}")
    one_line_error(e)

    partial = tmp_path / "partial.pth"  # right head, missing body layers
    sd = make_resnet18(10).state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4")}, partial)
    with pytest.raises(UserError, match="missing keys") as e:
        load_model(f"torchvision:resnet18@{partial}")
    one_line_error(e)


def test_unknown_arch():
    with pytest.raises(UserError, match="list_models") as e:
        load_model("torchvision:resnet19")
    assert "resnet18" in one_line_error(e)  # close-match suggestion
    with pytest.raises(UserError, match="not an image-classification") as e:
        load_model("torchvision:fasterrcnn_resnet50_fpn")
    one_line_error(e)


# ------------------------------------------------------------------ TorchScript
def test_torchscript_file(tmp_path):
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still works
        torch.jit.script(net).save(str(path))
    lm = load_model(f"{path}:size=32", num_classes=4)
    assert lm.spec.source == "torchscript" and lm.num_classes == 4 and lm.input_size == 32
    assert torch.allclose(outputs(lm.module), outputs(net), atol=1e-6)
    assert lm.weights_sha256 == file_sha256(str(path))

    with pytest.raises(UserError, match="predicts 4 classes") as e:
        load_model(str(path), num_classes=10)
    one_line_error(e)
    with pytest.raises(UserError, match="does not exist") as e:
        load_model(str(tmp_path / "missing.pt"))
    one_line_error(e)
    sd_file = tmp_path / "sd.pt"  # a state dict saved as .pt is not TorchScript
    torch.save(net.state_dict(), sd_file)
    with pytest.raises(UserError, match="torchvision:ARCH@") as e:
        load_model(str(sd_file))
    one_line_error(e)
    with pytest.raises(UserError) as e:
        load_model(str(path), init="scratch")
    one_line_error(e)


# ------------------------------------------------------------------ hub cache
def test_missing_hub_weights_names_the_file(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UserError) as e:
        load_model("torchvision:resnet18")
    msg = one_line_error(e)
    assert str(expected) in msg and "never downloads" in msg
    assert not expected.exists()
    with pytest.raises(UserError, match="IMAGENET1K_V1") as e:  # bad enum -> lists valid ones
        load_model("torchvision:resnet18@IMAGENET9K")
    one_line_error(e)


def test_timm_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    for text in ["timm:resnet18", "timm:resnet18@x.pth"]:
        with pytest.raises(UserError, match="timm is not installed: pip install timm") as e:
            load_model(text)
        one_line_error(e)


@pytest.fixture
def fake_hub_mobilenet(torch_home):
    """A randomly initialised mobilenet_v3_small saved where the loader looks for its weights."""
    torch.manual_seed(3)
    ref = torchvision.models.mobilenet_v3_small().eval()
    path = torch_home / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    return ref, path


def test_hub_teacher_and_pretrained_student(fake_hub_mobilenet):
    ref, path = fake_hub_mobilenet
    teacher = load_model("torchvision:mobilenet_v3_small")
    assert teacher.num_classes == 1000 and not teacher.module.training
    # input size None = the run's crop size (--image-size), as for ARCH@FILE: not the weights' eval crop
    assert (teacher.input_size, teacher.mean, teacher.std) == (None, IMAGENET_MEAN, IMAGENET_STD)
    assert teacher.weights_sha256 == file_sha256(str(path)) and teacher.weights_path == str(path)
    assert torch.equal(outputs(teacher.module), outputs(ref))
    with pytest.raises(UserError, match="predicts 1000 classes") as e:
        load_model("torchvision:mobilenet_v3_small", num_classes=10)
    one_line_error(e)

    same = load_model("torchvision:mobilenet_v3_small", num_classes=1000, init="pretrained")
    assert not same.head_reinitialized
    for k, v in ref.state_dict().items():
        assert torch.equal(same.module.state_dict()[k], v), k

    student = load_model("torchvision:mobilenet_v3_small:size=64", num_classes=10, init="pretrained")
    assert student.head_reinitialized and student.num_classes == 10 and student.input_size == 64
    assert student.class_names is None and student.weights_sha256 == teacher.weights_sha256
    got = student.module.state_dict()
    assert got["classifier.3.weight"].shape == (10, 1024)
    for k, v in ref.state_dict().items():
        if not k.startswith("classifier.3."):
            assert torch.equal(got[k], v), k
    assert outputs(student.module).shape == (2, 10)


def test_pretrained_with_state_dict_file_reinits_head(tmp_path):
    ref = make_resnet18(20)
    path = tmp_path / "ck20.pth"
    torch.save({"model": ref.state_dict(), "class_names": [str(i) for i in range(20)]}, path)
    lm = load_model(f"torchvision:resnet18@{path}", num_classes=10, init="pretrained")
    assert lm.head_reinitialized and lm.num_classes == 10 and lm.class_names is None
    assert torch.equal(lm.module.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


# ------------------------------------------------------------------ student init
def test_student_scratch(torch_home):
    lm = load_model("torchvision:resnet18", num_classes=10, init="scratch")
    assert lm.num_classes == 10 and lm.weights_sha256 is None and lm.module.training
    assert outputs(lm.module).shape == (2, 10)
    with pytest.raises(UserError) as e:  # scratch + named weights is contradictory
        load_model("torchvision:resnet18@x.pth", num_classes=10, init="scratch")
    one_line_error(e)


def test_student_init_file(tmp_path):
    ref = make_resnet18(10)
    good = tmp_path / "good.pth"
    torch.save({"model": ref.state_dict()}, good)
    lm = load_model("torchvision:resnet18", num_classes=10, init=str(good))
    assert lm.num_classes == 10 and lm.weights_sha256 == file_sha256(str(good))
    assert torch.equal(outputs(lm.module), outputs(ref))
    lm = load_model("torchvision:resnet18", init=str(good))  # class count inferred from the file
    assert lm.num_classes == 10

    bad = tmp_path / "three.pth"
    torch.save(make_resnet18(3).state_dict(), bad)
    with pytest.raises(UserError) as e:
        load_model("torchvision:resnet18", num_classes=10, init=str(bad))
    msg = one_line_error(e)
    assert "'fc.weight'" in msg and "(3, 512)" in msg and "(10, 512)" in msg
    assert "the store has 10 classes; the checkpoint head has 3" in msg and "three.pth" in msg

    with pytest.raises(UserError, match="missing.pth") as e:
        load_model("torchvision:resnet18", num_classes=10, init=str(tmp_path / "missing.pth"))
    one_line_error(e)
    # The init file wins over the spec's own '@...' (a student reloaded from its checkpoint).
    lm = load_model(f"torchvision:resnet18@{bad}", num_classes=10, init=str(good))
    assert lm.weights_path == str(good) and torch.equal(outputs(lm.module), outputs(ref))


def test_untrusted_pickle_refused(tmp_path):
    path = tmp_path / "ck.pth"
    torch.save({"model": make_resnet18(10).state_dict(), "cfg": ModelSpec("x", "torchscript", None, "x")},
               path)
    with pytest.raises(UserError, match="MEALKD_TRUST_CHECKPOINTS") as e:
        load_model(f"torchvision:resnet18@{path}")
    one_line_error(e)


# ------------------------------------------------------------------ timm plumbing (fake module)
class _FakeTimm:
    """Stands in for timm (not installed here): builds torchvision resnet18 with timm's attributes."""

    @staticmethod
    def is_model(name):
        return name == "resnet18"

    @staticmethod
    def create_model(name, pretrained=False, num_classes=1000):
        if pretrained:
            raise RuntimeError("Hugging Face Hub is offline")
        model = torchvision.models.resnet18(num_classes=num_classes)
        model.num_classes = num_classes
        model.pretrained_cfg = {"input_size": (3, 160, 160), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        model.get_classifier = lambda: model.fc
        return model


def test_timm_plumbing_with_fake_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", _FakeTimm)
    ref = make_resnet18(10)
    path = tmp_path / "t.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    lm = load_model(f"timm:resnet18@{path}", num_classes=10)
    assert lm.num_classes == 10 and lm.mean == (0.5, 0.5, 0.5) and lm.input_size is None
    assert torch.equal(outputs(lm.module), outputs(ref))
    assert load_model("timm:resnet18", num_classes=3, init="scratch").num_classes == 3
    for text in ["timm:resnet18", "timm:not_a_model"]:
        with pytest.raises(UserError) as e:
            load_model(text)
        one_line_error(e)


def test_googlenet_roundtrip_without_aux(tmp_path):
    """inception/googlenet: no aux heads, transform_input=True everywhere, so checkpoints round-trip."""
    student = load_model("torchvision:googlenet", num_classes=5, init="scratch")
    m = student.module
    assert m.transform_input and not m.aux_logits and m.aux1 is None
    path = tmp_path / "g.pth"
    torch.save({"model": m.state_dict(), "class_names": list("abcde")}, path)
    teacher = load_model(f"torchvision:googlenet@{path}", num_classes=5)
    assert teacher.module.transform_input and teacher.class_names == list("abcde")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(outputs(teacher.module, x), outputs(m, x))


def test_weights_files_keep_their_recorded_normalisation_and_say_which_weights_they_took(tmp_path, caplog):
    """A student trained at mean/std 0.5 stays so when its distill checkpoint or its export is reused as a
    teacher or as --init (ImageNet's were taken, silently; its labels were then wrong); the spec's own
    :mean=/:std= still win. A checkpoint with an EMA copy says which weights were loaded; an EMA-only file
    loads; a TorchScript file given as a state dict is named for what it is; safetensors files load."""
    from mealkd.core.checkpoint_io import CHECKPOINT_FORMAT, EXPORT_FORMAT

    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    sd = model.state_dict()
    half = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": sd, "norm": half}, ckpt)
    exported = tmp_path / "exported.pth"
    torch.save(sd, exported)
    (tmp_path / "exported.pth.json").write_text(json.dumps({"format": EXPORT_FORMAT, "input_size": 32, **half}))
    for file in (ckpt, exported):
        for init in ("weights", str(file)):
            spec = f"torchvision:mobilenet_v3_small@{file}" if init == "weights" else "torchvision:mobilenet_v3_small"
            loaded = load_model(parse_spec(spec), init=init, num_classes=3)
            assert (loaded.mean, loaded.std) == ((0.5,) * 3, (0.5,) * 3), (file, init)
    own = load_model(parse_spec(f"torchvision:mobilenet_v3_small@{ckpt}:mean=0.1/0.2/0.3"), init="weights")
    assert own.mean == (0.1, 0.2, 0.3) and own.std == (0.5,) * 3
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    assert load_model(parse_spec(f"torchvision:mobilenet_v3_small@{plain}"), init="weights").mean == tuple(IMAGENET_MEAN)

    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    both = tmp_path / "timm_style.pth"
    torch.save({"state_dict": sd, "state_dict_ema": ema}, both)
    with caplog.at_level("WARNING"):
        loaded = load_model(parse_spec(f"torchvision:mobilenet_v3_small@{both}"), init="weights")
    assert torch.equal(loaded.module.state_dict()["classifier.3.weight"], sd["classifier.3.weight"])
    assert "holds EMA weights too (under 'state_dict_ema'); the raw weights (under 'state_dict') were loaded" in caplog.text
    only_ema = tmp_path / "ema_only.pth"
    torch.save({"model_ema": ema}, only_ema)
    loaded = load_model(parse_spec(f"torchvision:mobilenet_v3_small@{only_ema}"), init="weights")
    assert torch.equal(loaded.module.state_dict()["classifier.3.weight"], ema["classifier.3.weight"])

    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model.eval()), scripted)
    with pytest.raises(UserError) as err:
        load_model(parse_spec(f"torchvision:mobilenet_v3_small@{scripted}"), init="weights")
    assert "a TorchScript file, which is a whole model, not a state dict" in one_line_error(err)
    safetensors = pytest.importorskip("safetensors.torch")
    st = tmp_path / "exported.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    loaded = load_model(parse_spec(f"torchvision:mobilenet_v3_small@{st}"), init="weights")
    assert torch.equal(loaded.module.state_dict()["classifier.3.weight"], sd["classifier.3.weight"])


def test_a_fixed_size_student_is_refused_at_another_size_in_one_line():
    from mealkd.core.models import LoadedModel
    from mealkd.distill.trainer import training_size

    def student(spec: str, size, fixed: bool) -> LoadedModel:
        return LoadedModel(parse_spec(spec), torch.nn.Identity(), 3, size, (0.5,) * 3, (0.5,) * 3, None, None, size_fixed=fixed)

    assert training_size(student("torchvision:resnet18", None, False), None, 64) == 64  # the store's crops
    assert training_size(student("torchvision:resnet18:size=48", 48, False), None, 64) == 48  # the spec's :size= (it was ignored)
    assert training_size(student("torchvision:resnet18", None, False), 40, 64) == 40
    assert training_size(student("m.pt2", 32, True), None, 64) == 32  # what a static .pt2 takes
    with pytest.raises(UserError) as err:
        training_size(student("m.pt2", 32, True), 48, 64)
    assert "--image-size 48: the student m.pt2 takes 32x32 images only" in one_line_error(err)


def test_a_vit_from_scratch_is_built_for_its_size_and_marked_fixed():
    from mealkd.distill.trainer import training_size

    vit = load_model(parse_spec("torchvision:vit_b_16:size=32"), num_classes=3, init="scratch")
    assert (vit.input_size, vit.size_fixed) == (32, True)
    assert vit.module(torch.zeros(1, 3, 32, 32)).shape == (1, 3)  # built for 32 px (torchvision's default is 224)
    assert training_size(vit, None, 64) == 32  # the store's 64-px crops are resized to what it takes
    plain = load_model(parse_spec("torchvision:vit_b_16"), num_classes=3, init="scratch")
    assert (plain.input_size, plain.size_fixed) == (224, True)  # a training at another --image-size is one line, not a Guard traceback
    with pytest.raises(UserError) as err:
        training_size(plain, 64, 64)
    assert "takes 224x224 images only" in one_line_error(err)
    with pytest.raises(UserError) as err:
        load_model(parse_spec("torchvision:vit_b_16:size=60"), num_classes=3, init="scratch")
    assert "multiple of 16" in one_line_error(err)

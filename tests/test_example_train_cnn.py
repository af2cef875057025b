"""examples/train_cnn.py: the with/without-BatchNorm experiment.

A one-epoch run on the default dataset (the fused runs reproduce nn.BatchNorm2d's,
batch norm beats no batch norm, the outputs are written), the checks catching a
batch norm that differs from nn's, the float64 lock step, and the MNIST IDX and
CIFAR-10 binary loaders on small files written here in the real formats.
"""
import contextlib
import functools
import gzip
import importlib.util
import io
import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_bn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_cnn.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_cnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train_cnn = _load_example()


def run_example(*argv):
    """main(argv) with progress bars off, on one thread; returns (exit status,
    report, stdout, stderr).

    One thread: on a machine whose cores are busy with other work, this small
    model's many short parallel regions make two threads wait on each other
    for whole scheduler slices (measured: 9 s per epoch instead of 0.2 s). The
    thread count changes the convolutions' rounding, so these curves are not
    bit for bit the default run's, but all four variants run with the same
    count, which is all the comparisons need."""
    out_dir = Path(argv[argv.index("--out") + 1])
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = train_cnn.main([*argv, "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    [json_path] = out_dir.glob("train_cnn_*.json")
    return status, json.loads(json_path.read_text()), stdout.getvalue(), stderr.getvalue()


def max_relative_difference(candidate, reference):
    return max(abs(c - r) / abs(r) for c, r in zip(candidate, reference))


# ----------------------------------------------------------------------------- default run

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default_run")
    return (*run_example("--epochs", "1", "--out", str(out)), out)


def test_default_run_fused_reproduces_nn(default_run):
    status, report, stdout, _, _ = default_run
    assert status == 0
    runs = report["runs"]
    assert list(runs) == ["no_bn", "nn", "fused", "fused_relu"]
    assert report["config"]["data"] == "digits" and report["config"]["dtype"] == "float32"
    nn_run = runs["nn"]
    for variant in ("fused", "fused_relu"):
        # Recomputed from the curves, not taken from the script's own verdict;
        # the tolerances are the script's, justified next to CURVE_RTOL.
        assert max_relative_difference(runs[variant]["train_loss"], nn_run["train_loss"]) <= 1e-4
        assert max_relative_difference(runs[variant]["val_loss"], nn_run["val_loss"]) <= 1e-4
        assert runs[variant]["val_correct"] == nn_run["val_correct"]
        assert max(report["first_step"][variant].values()) <= 1e-5
        assert report["fused_vs_nn"][variant]["ok"]
        assert f"{train_cnn.LABELS[variant]} vs nn.BatchNorm2d: OK" in stdout
    # The first-step comparison covers every gradient and the running statistics.
    compared = report["first_step"]["fused"]
    assert {"logits", "loss", "features.0.conv.weight.grad", "features.1.norm.weight.grad",
            "classifier.3.bias.grad", "features.0.norm.running_var",
            "features.1.norm.num_batches_tracked"} <= set(compared)


def test_default_run_batch_norm_beats_no_batch_norm(default_run):
    _, report, stdout, _, _ = default_run
    runs = report["runs"]
    for variant in ("nn", "fused", "fused_relu"):
        assert runs[variant]["train_loss"][0] < runs["no_bn"]["train_loss"][0]
        assert report["bn_lower_train_loss_than_no_bn"][variant] == [True]
        # Trained, not guessing (chance is 10%); measured 88%.
        assert runs[variant]["val_acc"][0] > 0.6
    assert "training loss below no BatchNorm's at 1 of 1 epochs" in stdout


def test_default_run_outputs(default_run):
    _, report, stdout, _, out = default_run
    png = out / "train_cnn_digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 800 and height > 300
    config = report["config"]
    assert config["train_samples"] + config["val_samples"] == 1797
    assert config["image_shape"] == [1, 8, 8]
    for variant, run in report["runs"].items():
        assert len(run["train_loss"]) == len(run["val_acc"]) == len(run["epoch_seconds"]) == 1
        assert run["epoch_seconds"][0] > 0
        # The printed summary line: final accuracy as in the JSON.
        assert f"{train_cnn.LABELS[variant]:<30} {100 * run['val_acc'][-1]:>12.2f}%" in stdout


# ----------------------------------------------------------------------------- the checks can fail

def _fused_bn_with(**changed):
    """fused_bn as the example sees it, but FusedBatchNorm2d built with other
    hyperparameters than nn.BatchNorm2d's defaults."""
    return types.SimpleNamespace(
        FusedBatchNorm2d=functools.partial(fused_bn.FusedBatchNorm2d, **changed),
        FusedBatchNormReLU2d=fused_bn.FusedBatchNormReLU2d,
        __version__=fused_bn.__version__)


@pytest.mark.parametrize("changed, curve", [
    (dict(momentum=0.2), "val_loss_max_rel_diff"),  # running statistics: the eval curves
    (dict(eps=1e-2), "train_loss_max_rel_diff"),    # the normalization itself
])
def test_checks_catch_a_batch_norm_unlike_nn(monkeypatch, tmp_path, changed, curve):
    monkeypatch.setattr(train_cnn, "fused_bn", _fused_bn_with(**changed))
    status, report, stdout, stderr = run_example(
        "--epochs", "1", "--train-limit", "256", "--val-limit", "100", "--out", str(tmp_path))
    assert status == 1
    assert "MISMATCH" in stderr
    check = report["fused_vs_nn"]["fused"]
    assert not check["ok"]
    assert check["first_step_max_rel_diff"] > check["first_step_rtol"]
    assert check[curve] > check["rtol"]
    assert report["fused_vs_nn"]["fused_relu"]["ok"]  # untouched


def test_compare_curves():
    reference = {"train_loss": [2.0, 1.0], "val_loss": [1.5, 0.5], "val_correct": [50, 90]}
    same = train_cnn.compare_curves(reference, dict(reference), 1e-4)
    assert same["ok"] and same["train_loss_max_rel_diff"] == 0
    for key, value in (("train_loss", [2.0, 1.0002]), ("val_loss", [1.5003, 0.5]),
                       ("val_correct", [50, 89])):
        assert not train_cnn.compare_curves(reference, {**reference, key: value}, 1e-4)["ok"]
    assert train_cnn.compare_curves(reference, {**reference, "train_loss": [2.0, 1.00009]},
                                    1e-4)["ok"]


def test_float64_runs_agree_to_1e_9(tmp_path):
    status, report, _, _ = run_example(
        "--dtype", "float64", "--epochs", "1", "--train-limit", "256", "--val-limit", "100",
        "--out", str(tmp_path))
    assert status == 0
    runs = report["runs"]
    for variant in ("fused", "fused_relu"):
        for curve in ("train_loss", "val_loss"):
            assert max_relative_difference(runs[variant][curve], runs["nn"][curve]) <= 1e-9
        assert max(report["first_step"][variant].values()) <= 1e-12


# ----------------------------------------------------------------------------- models and order

def test_variants_start_from_the_same_weights():
    models = train_cnn.initial_models(train_cnn.VARIANTS, 1, 16, 10, seed=3)
    reference = models["nn"].state_dict()
    for variant in ("fused", "fused_relu"):
        state = models[variant].state_dict()
        assert list(state) == list(reference)
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    # Interchangeable: any BN variant's state_dict loads strictly into any other.
    for source in ("nn", "fused", "fused_relu"):
        for target in ("nn", "fused", "fused_relu"):
            models[target].load_state_dict(models[source].state_dict())
    assert isinstance(models["fused"].features[0].norm, fused_bn.FusedBatchNorm2d)
    assert isinstance(models["fused_relu"].features[1].norm, fused_bn.FusedBatchNormReLU2d)
    no_bn = models["no_bn"].state_dict()
    for key, value in no_bn.items():
        if key.endswith("conv.bias"):
            assert torch.equal(value, torch.zeros_like(value))
        else:
            assert torch.equal(value, reference[key])
    # A different seed draws different weights.
    other = train_cnn.initial_models(["nn"], 1, 16, 10, seed=4)["nn"].state_dict()
    assert not torch.equal(other["features.0.conv.weight"], reference["features.0.conv.weight"])


def test_batch_orders():
    orders = train_cnn.batch_orders(100, 3, seed=0)
    again = train_cnn.batch_orders(100, 3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(orders, again))
    assert all(torch.equal(order.sort().values, torch.arange(100)) for order in orders)
    assert not torch.equal(orders[0], orders[1])


@pytest.mark.parametrize("argv", [["--data", "mnist"], ["--data", "digits", "x"],
                                  ["--data", "svhn", "x"], ["--data", "cifar10", "a", "b"]])
def test_bad_data_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        train_cnn.parse_args(argv)
    assert "--data" in capsys.readouterr().err


# ----------------------------------------------------------------------------- MNIST IDX

def write_idx_images(path, images, magic=0x00000803):
    count, rows, cols = images.shape
    payload = struct.pack(">iiii", magic, count, rows, cols) + images.astype(np.uint8).tobytes()
    _write(path, payload)


def write_idx_labels(path, labels, magic=0x00000801):
    _write(path, struct.pack(">ii", magic, len(labels)) + bytes(labels.astype(np.uint8)))


def _write(path, payload):
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(directory, n_train=20, n_test=8, side=28, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(count, side, side), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        write_idx_images(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx_labels(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    data = train_cnn.load_mnist(tmp_path)
    for split, prefix in ((data.train, "train"), (data.val, "t10k")):
        images, labels = arrays[prefix]
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(images), 1, 28, 28)
        assert np.array_equal(split.images[:, 0].numpy(), images)
        assert split.labels.dtype == torch.int64
        assert np.array_equal(split.labels.numpy(), labels)
    # Pixel (row 3, column 5) of image 2 is the byte at 16 + 2*784 + 3*28 + 5 of the raw file.
    if not gz:
        raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
        assert data.train.images[2, 0, 3, 5].item() == raw[16 + 2 * 784 + 3 * 28 + 5]


def test_mnist_loader_finds_torchvision_layout(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", n_train=4, n_test=2)
    data = train_cnn.load_mnist(tmp_path)
    assert np.array_equal(data.val.images[:, 0].numpy(), arrays["t10k"][0])


def _corrupt_mnist(tmp_path, how):
    write_mnist(tmp_path, n_train=6, n_test=4)
    images = np.zeros((6, 28, 28), dtype=np.uint8)
    if how == "image magic":
        write_idx_images(tmp_path / "train-images-idx3-ubyte", images, magic=0x00000801)
    elif how == "label magic":
        write_idx_labels(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4), magic=0x00000803)
    elif how == "truncated images":
        path = tmp_path / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-1])
    elif how == "truncated header":
        (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    elif how == "count mismatch":
        write_idx_labels(tmp_path / "train-labels-idx1-ubyte", np.zeros(5))
    elif how == "label range":
        write_idx_labels(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 10, 4, 5]))
    elif how == "not gzip":
        (tmp_path / "train-images-idx3-ubyte").unlink()
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip data at all")
    elif how == "size mismatch":
        write_idx_images(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 14, 14)))
    elif how == "missing":
        (tmp_path / "t10k-labels-idx1-ubyte").unlink()


@pytest.mark.parametrize("how, error, message", [
    ("image magic", ValueError, "magic number 0x00000801, expected 0x00000803"),
    ("label magic", ValueError, "magic number 0x00000803, expected 0x00000801"),
    ("truncated images", ValueError, "bytes, expected 4720 for 6 images of 28 x 28"),
    ("truncated header", ValueError, "shorter than an IDX label header"),
    ("count mismatch", ValueError, "holds 6 images but .* holds 5 labels"),
    ("label range", ValueError, "label 10 out of range"),
    ("not gzip", ValueError, "cannot read"),
    ("size mismatch", ValueError, r"training images are \(28, 28\), test images \(14, 14\)"),
    ("missing", FileNotFoundError, "t10k-labels-idx1-ubyte"),
])
def test_mnist_loader_rejects_bad_files(tmp_path, how, error, message):
    _corrupt_mnist(tmp_path, how)
    with pytest.raises(error, match=message):
        train_cnn.load_mnist(tmp_path)


def test_mnist_end_to_end(tmp_path):
    write_mnist(tmp_path / "mnist", n_train=64, n_test=32)
    status, report, _, _ = run_example("--data", "mnist", str(tmp_path / "mnist"), "--epochs", "1",
                                       "--batch-size", "16", "--out", str(tmp_path / "out"))
    assert status == 0
    assert report["config"]["image_shape"] == [1, 28, 28]
    assert report["config"]["train_samples"] == 64 and report["config"]["val_samples"] == 32
    assert all(check["ok"] for check in report["fused_vs_nn"].values())
    assert (tmp_path / "out" / "train_cnn_mnist.png").is_file()


# ----------------------------------------------------------------------------- CIFAR-10 binary

def cifar_record(label, image):
    """One record as the CIFAR-10 site describes it: the label byte, then the
    1024 red, 1024 green and 1024 blue values, each plane row-major."""
    red, green, blue = image
    return bytes([label]) + red.tobytes() + green.tobytes() + blue.tobytes()


def write_cifar(directory, per_batch=2, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch)
        (directory / name).write_bytes(b"".join(cifar_record(int(label), image)
                                                for label, image in zip(labels, images)))
        written[name] = (images, labels)
    return written


@pytest.mark.parametrize("inside_archive_folder", [False, True])
def test_cifar10_loader(tmp_path, inside_archive_folder):
    directory = tmp_path / "cifar-10-batches-bin" if inside_archive_folder else tmp_path
    written = write_cifar(directory, per_batch=3)
    data = train_cnn.load_cifar10(tmp_path)
    train_images = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    assert data.train.images.shape == (15, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert np.array_equal(data.train.images.numpy(), train_images)
    assert np.array_equal(data.train.labels.numpy(), train_labels)
    assert np.array_equal(data.val.images.numpy(), written["test_batch.bin"][0])
    assert np.array_equal(data.val.labels.numpy(), written["test_batch.bin"][1])
    # Green (channel 1), row 3, column 5 of the second record of data_batch_1.bin.
    raw = (directory / "data_batch_1.bin").read_bytes()
    assert data.train.images[1, 1, 3, 5].item() == raw[3073 + 1 + 1024 + 3 * 32 + 5]
    assert data.train.labels[1].item() == raw[3073]


@pytest.mark.parametrize("how, error, message", [
    ("short record", ValueError, "not a whole number of CIFAR-10 records"),
    ("empty", ValueError, "0 bytes, not a whole number"),
    ("label range", ValueError, "record 1 has label 10, out of range"),
    ("missing", FileNotFoundError, "test_batch.bin missing from"),
])
def test_cifar10_loader_rejects_bad_files(tmp_path, how, error, message):
    written = write_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    if how == "short record":
        path.write_bytes(path.read_bytes()[:-1])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "label range":
        images, _ = written["data_batch_3.bin"]
        path.write_bytes(cifar_record(0, images[0]) + cifar_record(10, images[1]))
    elif how == "missing":
        (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(error, match=message):
        train_cnn.load_cifar10(tmp_path)


def test_cifar10_end_to_end(tmp_path):
    write_cifar(tmp_path / "cifar", per_batch=8)
    status, report, _, _ = run_example("--data", "cifar10", str(tmp_path / "cifar"),
                                       "--epochs", "1", "--batch-size", "16",
                                       "--out", str(tmp_path / "out"))
    assert status == 0
    assert report["config"]["image_shape"] == [3, 32, 32]
    assert report["config"]["train_samples"] == 40 and report["config"]["val_samples"] == 8
    assert all(check["ok"] for check in report["fused_vs_nn"].values())


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
def test_default_run_on_cuda(tmp_path):
    status, report, _, _ = run_example("--device", "cuda", "--epochs", "1", "--out", str(tmp_path))
    assert status == 0
    assert report["config"]["device"] == "cuda"
    # A variant is either run and matching nn, or skipped with the library's reason.
    assert set(report["runs"]) | set(report["skipped"]) == set(train_cnn.VARIANTS)
    assert {"nn", "fused"} <= set(report["runs"])
    assert all(check["ok"] for check in report["fused_vs_nn"].values())

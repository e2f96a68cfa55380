import torch

from bdbench.models import create_model, with_normalization
from bdbench.training import TrainConfig, augment_batch, predict, train


def _model(ds, seed=0):
    torch.manual_seed(seed)
    return with_normalization(create_model("cnn-small", 10, 1, ds.image_size, width=8), ds.mean, ds.std)


def test_trainer_learns_digits(digits, effect):
    model = train(_model(digits), digits.x_train, digits.y_train, TrainConfig(epochs=6, batch_size=64),
                  seed=0, crop_padding=1)
    accuracy = (predict(model, digits.x_test) == digits.y_test).float().mean()
    effect.check("clean accuracy", accuracy, ">", 0.85)
    assert not model.training


def test_trainer_is_deterministic_under_a_seed(digits):
    config = TrainConfig(epochs=1, batch_size=64)
    a = train(_model(digits), digits.x_train, digits.y_train, config, seed=3, crop_padding=1)
    b = train(_model(digits), digits.x_train, digits.y_train, config, seed=3, crop_padding=1)
    c = train(_model(digits), digits.x_train, digits.y_train, config, seed=4, crop_padding=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_cpu_bfloat16_fast_path_learns_and_is_really_bfloat16(digits, effect):
    fast = TrainConfig(epochs=6, batch_size=64, cpu_bfloat16=True)
    seen = []

    def loss_fn(model, x, y):
        logits = model(x)
        seen.append((logits.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return torch.nn.functional.cross_entropy(logits, y)

    model = train(_model(digits), digits.x_train, digits.y_train, fast, seed=0, crop_padding=1,
                  device=torch.device("cpu"), loss_fn=loss_fn)
    assert set(seen) == {(torch.bfloat16, True)}
    effect.check("clean accuracy", (predict(model, digits.x_test) == digits.y_test).float().mean(), ">", 0.85)
    # Handed back in the usual layout, with float32 weights, for defenses and quantization.
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    slow = train(_model(digits), digits.x_train, digits.y_train, fast.model_copy(update={"cpu_bfloat16": False}),
                 seed=0, crop_padding=1, device=torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), slow.state_dict().values()))


def test_augment_crop_is_a_translation_and_flips_only_when_allowed():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 4] = 1.0  # one bright pixel
    out = augment_batch(x, crop_padding=2, hflip=False, generator=g)
    assert out.shape == x.shape
    rows, cols = torch.nonzero(out[:, 0] == 1.0, as_tuple=True)[1:]
    assert rows.min() >= 1 and rows.max() <= 5 and cols.min() >= 2 and cols.max() <= 6
    assert len(rows) == 64  # a 2-pixel shift never pushes the pixel out
    assert (out.sum(dim=(1, 2, 3)) == 1).all()
    # Without padding and without flips the batch is unchanged; with flips some images mirror.
    assert torch.equal(augment_batch(x, 0, False, g), x)
    flipped = augment_batch(x, 0, True, g)
    mirrored = flipped[:, 0, 3, 3] == 1.0
    assert 0 < int(mirrored.sum()) < 64


def test_batch_hook_sees_every_batch_and_can_change_it(digits):
    calls = []

    def hook(x, y, generator, index):
        calls.append(x.shape[0])
        assert torch.equal(x, digits.x_train[index].float() / 255)  # no padding/flip: the rows themselves
        return x, torch.zeros_like(y)  # relabel everything to 0

    model = train(_model(digits), digits.x_train, digits.y_train, TrainConfig(epochs=1, batch_size=100),
                  seed=0, hook=hook)
    assert calls == [100] * (len(digits.y_train) // 100)
    assert (predict(model, digits.x_test) == 0).float().mean() > 0.9


def test_loss_fn_replaces_the_objective(digits):
    seen = []

    def always_predict_three(model, x, y):
        seen.append(len(x))
        return torch.nn.functional.cross_entropy(model(x), torch.full_like(y, 3))

    model = train(_model(digits), digits.x_train, digits.y_train, TrainConfig(epochs=1, batch_size=100),
                  seed=0, loss_fn=always_predict_three)
    assert len(seen) == len(digits.y_train) // 100
    assert (predict(model, digits.x_test) == 3).float().mean() > 0.9


def test_training_epochs_are_reported_to_a_progress_listener(digits):
    from bdbench.progress import listening

    heard = []
    with listening(lambda what, number, total: heard.append((what, number, total))):
        train(_model(digits), digits.x_train[:128], digits.y_train[:128], TrainConfig(epochs=3, batch_size=64), seed=0)
    train(_model(digits), digits.x_train[:128], digits.y_train[:128], TrainConfig(epochs=1, batch_size=64), seed=0)
    assert heard == [("training epoch", 1, 3), ("training epoch", 2, 3), ("training epoch", 3, 3)]  # none outside

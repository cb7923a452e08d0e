import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxclf.models import create_model, model_names
from jaxclf.models.registry import resolve_model


def _params(name, shape=(28, 28, 1), num_classes=10, **kw):
  model = create_model(name, num_classes, **kw)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))
  return model, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


# Parameter counts of the full-size models (10 classes): checked against the architecture
# arithmetic (convs without bias + BN scale/bias + head), e.g. the default CNN equals the
# PyTorch anchor's 150,698 and VGG-16 = sum(c_in*c_out*9 + 2*c_out) + 512*10 + 10.
@pytest.mark.parametrize("name, shape, expected", [
    ("cnn", (28, 28, 1), 150_698),
    ("resnet18", (32, 32, 3), 11_173_962),
    ("resnet34", (32, 32, 3), 21_282_122),
    ("resnet50", (32, 32, 3), 23_520_842),
    ("vgg11", (32, 32, 3), 9_228_362),
    ("vgg16", (32, 32, 3), 14_724_042),
])
def test_full_model_parameter_counts(name, shape, expected):
  _, n = _params(name, shape)
  assert n == expected


@pytest.mark.parametrize("name", ["cnn_tiny", "resnet_tiny", "vgg_tiny"])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_tiny_models_output_shape(name, shape):
  model = create_model(name, 7)
  x = jnp.ones((3, *shape))
  variables = model.init(jax.random.key(0), x, train=False)
  assert model.apply(variables, x, train=False).shape == (3, 7)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(1)})
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  assert "batch_stats" in updates


def test_every_registered_model_builds():
  for name in model_names():
    assert callable(resolve_model(name))


def test_one_real_step_on_tiny_model_reduces_loss():
  model = create_model("cnn_tiny", 10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 16))
  variables = model.init(jax.random.key(0), x, train=False)
  tx = optax.sgd(0.1, momentum=0.9)
  opt = tx.init(variables["params"])

  def loss_fn(p, stats):
    logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

  p, stats = variables["params"], variables["batch_stats"]
  first = None
  for _ in range(5):
    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(p, stats)
    first = loss if first is None else first
    u, opt = tx.update(g, opt, p)
    p, stats = optax.apply_updates(p, u), upd["batch_stats"]
  assert float(loss) < float(first)


def test_custom_model_by_import_path():
  model = create_model("jaxclf.models.resnet:ResNetTiny", 4)
  x = jnp.ones((2, 16, 16, 3))
  assert model.apply(model.init(jax.random.key(0), x), x).shape == (2, 4)


def test_unknown_model_suggests():
  with pytest.raises(ValueError, match="Did you mean 'resnet18'"):
    create_model("resnet81", 10)


def test_cnn_torch_init_matches_pytorch_default_bounds():
  """weight_init="torch" draws every kernel from U(+-1/sqrt(fan_in)), PyTorch's Conv2d/Linear default;
  the paths and shapes are those of the lecun init, so checkpoints do not care which ran."""
  layers = (32, "M", 64, "M")
  variables = {}
  for init in ("lecun", "torch"):
    model = create_model("cnn", 10, layers=layers, weight_init=init)
    variables[init] = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  assert jax.tree.structure(variables["lecun"]) == jax.tree.structure(variables["torch"])
  kernels = {"/".join(str(k.key) for k in path): leaf for path, leaf
             in jax.tree_util.tree_leaves_with_path(variables["torch"]["params"])
             if path[-1].key == "kernel"}
  assert len(kernels) == 3  # two convs and the classifier
  for name, k in kernels.items():
    fan_in = int(np.prod(k.shape[:-1]))
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(k).max() <= bound, name
    # a uniform draw on +-bound has std bound/sqrt(3); thousands of samples pin it to a few %
    assert abs(float(np.std(k)) / (bound / np.sqrt(3)) - 1) < 0.1, name
  with pytest.raises(ValueError, match="model.kwargs.weight_init"):
    create_model("cnn", 10, layers=layers, weight_init="xavier").init(
        jax.random.key(0), jnp.zeros((1, 28, 28, 1)))

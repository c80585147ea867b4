"""Public API documentation: docstrings with shapes and dtypes, and the README's drop-in section."""
import importlib
import inspect
import pathlib
import re

import pytest

MODULES = ["vqkern", "vqkern.functional", "vqkern.modules", "vqkern.reference", "vqkern.kmeans",
           "vqkern.distributed", "vqkern.compat", "vqkern.compat.vector_quantize", "vqkern.compat.residual_vq",
           "vqkern.compat.codebook", "vqkern.compat.rotation"]
SHAPE = re.compile(r"\((\.\.\.|[A-Z]|B,|C,|M,|x |num_)|shape")
DTYPE = re.compile(r"float|int64|bool|dtype")


def _public_api():
    seen = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                seen[f"{module.__name__}.{attr}"] = obj
            elif inspect.isclass(obj):
                seen[f"{module.__name__}.{attr}"] = obj
                for member, value in vars(obj).items():
                    if (member.startswith("_") or member == "extra_repr") and member != "forward":
                        continue
                    if inspect.isfunction(value) or isinstance(value, property):
                        seen[f"{module.__name__}.{attr}.{member}"] = value
    return seen


def _takes_tensors(obj) -> bool:
    if not inspect.isfunction(obj):
        return False
    text = str(inspect.signature(obj))
    return "Tensor" in text or obj.__name__ == "forward"


@pytest.mark.parametrize("name,obj", sorted(_public_api().items()), ids=sorted(_public_api()))
def test_docstring_with_shapes_and_dtypes(name, obj):
    doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
    assert doc, f"{name} has no docstring"
    if _takes_tensors(obj):
        assert SHAPE.search(doc), f"{name}'s docstring gives no shape"
        assert DTYPE.search(doc), f"{name}'s docstring gives no dtype"


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_readme_shows_the_drop_in_switch_and_every_supported_option():
    from test_compat import SUPPORTED

    section = _section("Drop-in for vector-quantize-pytorch")
    switch = re.search(r"# from vector_quantize_pytorch import (.+)\n(from vqkern\S* import \1)\n", section)
    assert switch, "the one-line switch of the import is not shown"
    exec(switch.group(2), {})  # the line it shows works
    for option in SUPPORTED:
        assert f"`{option}`" in section, f"{option} is not in the README's list of options"


def test_readme_shows_multi_gpu_training():
    section = _section("Training on several GPUs")
    assert "DistributedDataParallel" in section and "init_process_group" in section and "torchrun" in section

"""The oracle stands apart: vqkern.reference imports nothing from the package it checks."""
import ast
import pathlib

import torch

import vqkern
from vqkern import reference


def test_reference_imports_nothing_from_vqkern():
    tree = ast.parse(pathlib.Path(reference.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("vqkern"), \
                f"vqkern/reference.py line {node.lineno} imports from vqkern"
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("vqkern") for a in node.names), \
                f"vqkern/reference.py line {node.lineno} imports vqkern"


def test_reference_quantizer_output_has_the_fields_of_vqoutput():
    assert reference.ReferenceVQOutput._fields == vqkern.VQOutput._fields
    out = reference.ReferenceVectorQuantizer(16, 4)(torch.randn(10, 4))
    assert isinstance(out, reference.ReferenceVQOutput)
    assert out.quantized.shape == (10, 4) and out.indices.dtype == torch.int64

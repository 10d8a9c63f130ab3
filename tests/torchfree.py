"""Code a test subprocess runs first to behave like a device install: importing torch,
transformers or optimum fails, and ``importlib.util.find_spec`` does not find them."""

BLOCK_TORCH = """
import sys, importlib.abc, importlib.util
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] in ('torch', 'transformers', 'optimum') else _find_spec(name, *a)
"""

ASSERT_TORCH_FREE = """
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), 'torch was imported'
"""

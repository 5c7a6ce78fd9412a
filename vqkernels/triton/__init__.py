"""Triton kernels (kernels.py), their block shapes (configs.py) and launchers (launch.py).

Imported only when backend="triton" is asked for, so `import vqkernels` never needs triton.
"""

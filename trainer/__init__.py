"""The training side (PyTorch). Nothing under serve/ imports this package."""
import os

# OpenMP threads that spin while waiting thrash when another process shares the cores: a VAE step on
# this 2-core machine took 2.92 s with spinning and 0.26 s with passive waiting while another CPU-bound
# process ran. Must be set before torch loads libgomp; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

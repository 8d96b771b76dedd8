"""Performance of the kernels on accelerators: chip constants (`chips`)."""

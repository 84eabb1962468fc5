"""The conversion command: downloaded checkpoints → the project's safetensors files, which later
load as plain memory maps with no renaming. ``python -m weights_convert --help`` lists the
conversions. The formats themselves are read by ``ipadapter_min.formats``."""

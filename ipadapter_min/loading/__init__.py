"""Files → models. Each model is built once on the meta device, every key and shape that the
format readers hand over is checked against that build (``checked.py``), and the tensors become
its parameters, cast one at a time: no random initialisation, and the memory of the weights only.

It imports from: formats, ip_adapter, models.
"""

"""The model loaders, one module per pretrained model: :mod:`~medisyn.models.sdxl`,
:mod:`~medisyn.models.biomedclip`, :mod:`~medisyn.models.inception` (FID features),
:mod:`~medisyn.models.resnet` (the utility gate's classifier). Each can also build a tiny stand-in in
the same on-disk format; a whole tiny set for the demo and the tests is built by
:func:`medisyn.demo.tiny_models.build_tiny_models`."""

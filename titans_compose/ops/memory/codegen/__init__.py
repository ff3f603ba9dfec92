"""The kernel generator: Triton source specialised per memory configuration (:mod:`key`), cached on disk and
imported by path (:mod:`cache`)."""

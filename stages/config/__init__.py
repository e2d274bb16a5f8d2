"""Typed configuration: the sections and their defaults (:mod:`.sections`), and the options
of every registered model and loss, cached on disk (:mod:`.options`)."""

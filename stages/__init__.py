"""AOQ retrieval pipeline: staged jobs for image-text matching with offline hard negatives."""

__version__ = "0.1.0"

"""The features stage: image features and caption/split files into a dataset folder.

* :mod:`.annotations`: captions, ids and image paths per split from Karpathy's split files
  or COCO caption JSON.
* :mod:`.butd_tsv`: bottom-up-attention region features from TSV.
* :mod:`.precomp`: SCAN/VSE++ ``*_ims.npy`` into the HDF5 layout.
* :mod:`.writer`: the resumable ``{split}.h5`` writer they share.
"""

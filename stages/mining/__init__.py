"""Offline hard negatives, from embeddings to the training batch: the FAISS wrapper
(:mod:`.knn`), mining a split's candidates (:mod:`.mine`), the candidate and embedding files
(:mod:`.candidate_files`, :mod:`.embedding_files`), the false-negative-aware filters
(:mod:`.selection`), the sampler that draws from what they keep (:mod:`.sampler`), and how
hard the mined negatives are (:mod:`.hardness`)."""

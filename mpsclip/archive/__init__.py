"""Image archives: list items (:mod:`.sources`, :mod:`.webdataset`, :mod:`.geotiff`), embed them into a Parquet
store (:mod:`.embedder`, :mod:`.embed`, :mod:`.ray_embed`, :mod:`.store`) and search the store with text or images
(:mod:`.search`), optionally through a FAISS index (:mod:`.index`)."""

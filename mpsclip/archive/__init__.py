"""Image archives: items (:mod:`.items`: kinds, tile settings, read errors) are read by :mod:`.readers` and listed
by :mod:`.sources` (with :mod:`.webdataset` and :mod:`.geotiff`); :mod:`.job` embeds them into a Parquet store
(:mod:`.store`) shard by shard with :mod:`.embedder`, locally or on Ray (:mod:`.ray_executor`); :mod:`.search`
searches the store with text or images, optionally through a FAISS index (:mod:`.index`)."""

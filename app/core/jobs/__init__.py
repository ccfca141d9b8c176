"""Bulk jobs: a file of sequences embedded on the whole fleet, its result kept in a store.

A job's input is validated as it streams in and cut into chunks (``intake``), each written to
the result store (``app.core.store``: a directory or any fsspec URL); the job's spec and state live
there too, so any API replica can answer for any job and a job survives the process that
accepted it and a Redis restart. One API process at a time drives a job (``runner``), holding a
lease (``leases``): each chunk goes through the embedding service like a request — cache
lookup, then its misses queued on the artifact's bulk stream, which workers read only when no
interactive request waits — and its result is written to the store; at the end the chunks are
assembled into the result, written atomically. ``manager`` is what the HTTP routes call: it
creates, lists, cancels and opens jobs, and resumes the jobs whose driver died.

Store layout (``<root>`` = ``job_store``)::

    <root>/<owner>/<job>/job.json          the spec (options, counts), written once
    <root>/<owner>/<job>/state.json        status and progress, rewritten by the driver
    <root>/<owner>/<job>/inputs/<n>.json   chunk n's records (number, id, sequence)
    <root>/<owner>/<job>/chunks/<n>.*      chunk n's result (.npy pooled / .npz) and .json
    <root>/<owner>/<job>/result.*          the result (.npz; pooled also .npy and ids.txt)
    <root>/_active/<owner>.<job>           a job not yet ended (what drivers pick up)
    <root>/_done/<ended>.<owner>.<job>     an ended job, by end time (what retention sweeps)
"""

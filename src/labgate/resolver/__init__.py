"""The dataset registry ("data DNS").

- :mod:`~labgate.resolver.identifiers`: DOI, Handle, ARK, URN and URL
  spellings normalized to one canonical form.
- :mod:`~labgate.resolver.registry`: datasets and replicas in the database:
  register, update, search, delete.
- :mod:`~labgate.resolver.inventory`: a site's bulk inventory push (the
  federation "push" model) and the staleness of what it reported.
- :mod:`~labgate.resolver.locality`: resolve (live replicas, launch links) and
  what a launch near the data needs (mounts, or a fetch into a site's cache).
A URL dataset no site holds is fetched by the site that will mount it
(:mod:`labgate.agent.fetch`, through its site link), into that site's cache.
"""

"""The three interchangeable backends (merge, ensemble, route) behind one Combiner interface."""

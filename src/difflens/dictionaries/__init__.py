"""difflens.dictionaries"""

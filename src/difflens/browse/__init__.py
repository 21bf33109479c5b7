"""difflens.browse"""

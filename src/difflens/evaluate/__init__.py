"""difflens.evaluate"""

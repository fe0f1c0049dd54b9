"""moekit.parallel"""

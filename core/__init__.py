"""The science every part of unhans shares: data and artifacts, models, attribution, SpRAy, CAVs, ClArC."""

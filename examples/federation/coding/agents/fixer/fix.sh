cat > /dev/null  # the redacted report
echo "under investigation: reproduced with a quoted field holding a comma" > "$FS9_PROGRESS"
echo "fix deployed: export.py quotes every field (release 1.2.3)" > "$FS9_PROGRESS"
printf 'type: work_request\nclassification: public\ncorrelation-id: %s\n\nbug fixed: the CSV export corrupted fields holding commas; fixed in release 1.2.3\n' \
    "$FS9_CORR" > "$FS9_OUTBOX/docs@knowledge"
echo "release 1.2.3: the CSV export quotes every field" > "$FS9_MNT/topics/releases"  # to whoever listens
echo "fixed in release 1.2.3: export.py quotes every field"

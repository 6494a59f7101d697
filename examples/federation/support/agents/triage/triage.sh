# the report (stdin) with e-mail addresses and phone numbers redacted
report=$(sed -E -e 's/[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]+/[redacted]/g' \
                -e 's/\+?[0-9][0-9 -]{7,}[0-9]/[redacted]/g')
printf 'type: work_request\nclassification: public\ncorrelation-id: %s\non-status-change: cases\non-completion: cases\n\n%s\n' \
    "$FS9_CORR" "$report" > "$FS9_OUTBOX/fixer@coding"
echo "triaged: a bug in the CSV export, handed to fixer@coding (customer details redacted)"

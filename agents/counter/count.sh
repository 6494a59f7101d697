#!/bin/sh
read n
i=1
while [ "$i" -le "${n:-3}" ]; do echo "$i"; i=$((i+1)); sleep 1; done

#!/usr/bin/perl
# Input: the text of a work_request. Output (its result): the word count.
use strict;
use warnings;
local $/;
my $text = <STDIN>;
my @words = split ' ', $text;
my $n = scalar @words;
my $mnt = $ENV{FS9_MNT};
open(my $topic, '>', "$mnt/topics/pipeline") or die "topic: $!";
print $topic "tally: $n words\n";
close($topic) or die "topic: $!";
open(my $mail, '>', "$ENV{FS9_OUTBOX}/report") or die "outbox: $!";
print $mail "type: work_request\ncorrelation-id: $ENV{FS9_CORR}\n\nwords=$n\n$text";
close($mail) or die "outbox: $!";
print "$n\n";
